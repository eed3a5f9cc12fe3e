"""metagradient(compile=...): the reverse step through ONE compiled graph per shape, the optimizer's
per-step floats as tensor inputs (dattri_fn.training.compile). Backends that run no C++ compile: a
counting backend that returns the traced graph (each compile calls it once) and aot_eager."""

import warnings

import pytest
import torch
from test_magic_auto import problem

from dattri_fn.attribute.metagradient import metagradient
from dattri_fn.training import adamw, cosine_schedule, sgd
from dattri_fn.training.compile import ReverseStep

RUNS = {
    "sgd-momentum-wd": dict(hidden=5, lr=0.0, momentum=0.0, weight_decay=0.0,
                            opt=sgd(cosine_schedule(0.6, 6, recursive=True), momentum=0.5,
                                    weight_decay=0.1)),
    "adamw-cosine": dict(hidden=5, lr=0.0, momentum=0.0, weight_decay=0.0,
                         opt=adamw(cosine_schedule(0.2, 6, recursive=True), weight_decay=0.1)),
}


class Counting:
    """A torch.compile backend that counts the graphs it is handed and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def run(name, n=12):
    # n = 12, batches of 4: every step the same shapes (no short last batch).
    return problem(4, n=n, **RUNS[name])


@pytest.mark.parametrize("name", list(RUNS))
def test_one_graph_for_every_step_and_values_equal_eager(name):
    """The full pass (T = 9 steps, a schedule: lr changes every step): ONE graph, no warning, and
    weights / params equal the eager pass to 1e-12 relative (float64; the compiled region runs
    the same ops but Adam's addcdiv as p + s (m / d)). A per-step recompile (an int or float
    constant of the step in the graph) makes T graphs or dynamo's recompile error."""
    loss, opt, step, data, test, order, traj, cot = run(name)
    backend = Counting()
    ref = metagradient(step, traj, data, order, cot)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        out = metagradient(step, traj, data, order, cot, compile=backend)
    assert len(order) == 9 and backend.graphs == 1
    scale = ref.weights.abs().max()
    assert scale > 1e-3
    torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=1e-12 * float(scale))
    for key in ref.params:
        torch.testing.assert_close(out.params[key], ref.params[key], rtol=1e-12, atol=1e-14)


def test_band_with_early_exit_and_chunks_one_graph_per_shape():
    """horizon="band" with early exit and chunks of 3: the compiled pass equals eager (1e-12) and
    compiles one graph per (chunk rows) shape met, not per step."""
    loss, opt, step, data, test, order, traj, cot = run("adamw-cosine")
    kw = dict(horizon="band", early_exit=(1.1, 1), chunk_size=3)
    ref = metagradient(step, traj, data, order, cot, **kw)
    backend = Counting()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = metagradient(step, traj, data, order, cot, compile=backend, **kw)
    torch.testing.assert_close(out.weights, ref.weights, rtol=0,
                               atol=1e-12 * float(ref.weights.abs().max()))
    assert torch.equal(out.walked, ref.walked) and torch.equal(out.horizon, ref.horizon)
    k = len(ref.walked)
    # Chunk shapes: 3 and k % 3 rows while all targets walk, fewer once some stop.
    assert 1 <= backend.graphs <= 3 < len(order), (backend.graphs, ref.walked.tolist(), k)


def test_a_step_without_a_scalars_form_warns_once_and_runs_eager():
    """A vjp_step that is a plain function (no optimizer attached): one RuntimeWarning naming
    the reason, the eager pass bit for bit."""
    loss, opt, step, data, test, order, traj, cot = run("sgd-momentum-wd")

    def plain(params, opt_state, batch, weights):
        return step(params, opt_state, batch, weights)

    ref = metagradient(step, traj, data, order, cot, vjp_step=plain)
    with pytest.warns(RuntimeWarning, match="no optimizer with a scalars form") as rec:
        out = metagradient(step, traj, data, order, cot, vjp_step=plain, compile=Counting())
    assert len(rec) == 1
    assert torch.equal(out.weights, ref.weights)


def test_a_failing_compile_warns_once_naming_it_and_runs_eager():
    """A backend that raises (as a missing C++ compiler does): one warning with the error, the
    eager pass bit for bit, never a crash."""
    loss, opt, step, data, test, order, traj, cot = run("adamw-cosine")

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    ref = metagradient(step, traj, data, order, cot)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found") as rec:
        out = metagradient(step, traj, data, order, cot, compile=broken)
    assert len(rec) == 1
    assert torch.equal(out.weights, ref.weights)


def test_a_miscompiled_graph_is_caught_by_the_first_step_check():
    """A backend whose graph is 1% off (as inductor's text-lm step was O(1) off): the new graph's
    check against the eager step warns once naming the difference, and the pass is eager's bit
    for bit."""
    loss, opt, step, data, test, order, traj, cot = run("adamw-cosine")

    def off(gm, example_inputs):
        def wrong(*args):
            return [x * 1.01 if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                    for x in gm.forward(*args)]
        return wrong

    ref = metagradient(step, traj, data, order, cot)
    with pytest.warns(RuntimeWarning, match="differs from the eager one by 0.01") as rec:
        out = metagradient(step, traj, data, order, cot, compile=off)
    assert len(rec) == 1
    assert torch.equal(out.weights, ref.weights)


def test_too_many_graphs_warn_and_stop_compiling():
    """More graphs than max_graphs (here 0 allowed beyond the first: max_graphs=0) turns the
    compiled path off with a warning naming the count."""
    loss, opt, step, data, test, order, traj, cot = run("sgd-momentum-wd")
    rs = ReverseStep(step, Counting(), max_graphs=0)
    with pytest.warns(RuntimeWarning, match="1 graphs compiled"):
        from dattri_fn.attribute.metagradient import _split
        floats, how = _split(traj.checkpoints[0])
        bar = [torch.zeros((2, *f.shape), dtype=f.dtype) for f in floats]
        out = rs(floats, how, (data[0][:4], data[1][:4]), torch.ones(4, dtype=floats[0].dtype),
                 bar, None)
    assert out is not None and rs.reason is not None
    assert rs(floats, how, (data[0][:4], data[1][:4]), torch.ones(4, dtype=floats[0].dtype),
              bar, None) is None


def test_compile_argument_is_checked():
    loss, opt, step, data, test, order, traj, cot = run("sgd-momentum-wd")
    with pytest.raises(TypeError, match="compile"):
        metagradient(step, traj, data, order, cot, compile=3)
