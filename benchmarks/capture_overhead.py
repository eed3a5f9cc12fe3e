"""Per-call time of the capture engine's users: LoGra, FactGraSS and Grad-Dot on a bundled task.

    OMP_NUM_THREADS=1 python -m benchmarks.capture_overhead [--task digits-mlp] [--repeats 20]
    OMP_NUM_THREADS=1 python -m benchmarks.capture_overhead --gpt2 [--profile]

Times (median thread CPU time of ``--repeats`` warm calls, one process): ``prepare`` + ``score`` as
``benchmarks.run`` calls them (same sizes), one ``batched_io`` pass of the capture engine on a
256-row batch, and the bare forward + backward of the same batch without the engine (the floor
the engine's overhead sits on). ``--gpt2``: a tiny GPT-2 (2 layers, width 64, 16 x 32
tokens; its Conv1D layers).
``--profile``: a cProfile of the engine's batched pass (top 25 by cumulative time).

``--floor``: Grad-Dot's ``prepare + score`` as ``benchmarks.g_against`` runs it (its task sizes,
models and recipe) split into its parts, each timed on its own and all of them interleaved
round by round with dattri 0.3.0's TracInAttributor on the same data (``--rounds``): the plan
check of ``prepare`` (autodiff on its 3 examples, the factored pass over them, both in one
autograd engine call, the pass with the first and last examples' rows and the pass's parameter
gradients in one call as the check now runs it, the whole check), the
one capture pass of ``score`` over ``[test, *train]`` (the engine's, and mlp_io's, which a held
plain-MLP plan takes since stop 24), the score blocks, and a bare forward +
backward over the same rows (``functional_call`` + ``autograd.grad``, no capture: the floor a
pass sits on). Medians of thread CPU ms, and each part's share of dattri's median.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (dattri imports it)

import torch  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    """Median CPU time of this thread per call (ms): less sensitive than wall time to other
    jobs on shared cores (time waiting for a core is not counted)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return 1e3 * statistics.median(times)


def _engine_calls(fm, batch, kinds=("linear", "conv1d", "conv2d", "embedding")):
    """Return (engine pass, bare forward+backward) closures on one batch (layers of ``kinds``)."""
    from dattri_fn.transforms import capture
    from dattri_fn.transforms.layers import batched_io, output_shapes, unpack_example

    names = [n for n, s in capture.layer_specs(fm.module).items()
             if s.weight in fm.params and s.kind in kinds]
    tapped = capture.tap(fm.module, names)
    state = {**fm.fixed, **fm.params}
    args, kwargs, target = unpack_example(batch)
    like = next(iter(fm.params.values()))
    shapes = output_shapes(tapped, state, args, kwargs, like)

    def engine():
        return batched_io(tapped, fm.loss_fn, state, args, kwargs, target, shapes, like)

    def bare():
        live = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
        with torch.enable_grad():
            out = torch.func.functional_call(fm.module, {**fm.fixed, **live}, args, kwargs)
            loss = fm.loss_fn(out, target) if target is not None else fm.loss_fn(out)
            return torch.autograd.grad(loss, list(live.values()))

    return engine, bare


def digits(task_name: str, repeats: int, profile: bool) -> None:
    from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM, LOGRA_K
    from dattri_fn.app.recipes import recipe
    from dattri_fn.attribute.factgrass import factgrass
    from dattri_fn.attribute.gradsim import grad_dot
    from dattri_fn.attribute.logra import logra
    from dattri_fn.eval.tasks import get_task, train_model
    from dattri_fn.model import functional_model

    task = get_task(task_name, n_train=500, n_test=50, seed=0)
    model = train_model(task, seed=0).eval()
    fm = functional_model(model, task.loss_fn)
    r = recipe("grad-dot", task, [model], batch_size=256)
    methods = {"logra": logra(fm, proj_dim=LOGRA_K),
               "factgrass": factgrass(fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP),
               "grad-dot": grad_dot(fm)}
    print(f"{task_name}: n_train=500 n_test=50, median CPU ms of {repeats} warm calls")
    for name, m in methods.items():
        state = m.prepare(fm.params, r.train)
        prep = _median_ms(lambda m=m: m.prepare(fm.params, r.train), repeats)
        score = _median_ms(lambda m=m, s=state: m.score(fm.params, s, r.train, r.test), repeats)
        print(f"  {name:10s} prepare {prep:7.2f}  score {score:7.2f}  total {prep + score:7.2f}")
    batch = (task.x_train[:256], task.y_train[:256])
    engine, bare = _engine_calls(fm, batch)
    print(f"  engine batched_io [256]  {_median_ms(engine, repeats):7.3f}")
    print(f"  bare fwd+bwd      [256]  {_median_ms(bare, repeats):7.3f}")
    if profile:
        _profile(engine)


def floor(task_name: str, rounds: int) -> None:
    """Grad-Dot's parts against dattri's whole run, interleaved (module docstring)."""
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    from benchmarks.run import DEFAULT_SIZES, load_models, load_task, runner_for, train_states
    from dattri_fn._checks import batch_cat, batch_slice
    from dattri_fn.attribute.gradsim import grad_dot
    from dattri_fn.model import functional_model
    from dattri_fn.transforms.layer_grads import _check, _plain_mlp, layer_plan
    from dattri_fn.transforms.layer_grads_paths import _example_rows, _factored, _factored_and_rows

    n_train, n_test, _ = DEFAULT_SIZES[task_name]
    task = load_task({"name": task_name, "n_train": n_train, "n_test": n_test, "seed": 0,
                      "device": "cpu"})
    models = load_models(task, train_states(task, 3))
    hp = {"damping": 1e-3, "proj_dim": 512, "max_iter": 100, "arnoldi_rank": 64,
          "arnoldi_block": 16, "batch_size": 256, "seed": 0, "device": "cpu"}
    ours, theirs = (runner_for(side, "grad-dot", task, models, hp) for side in ("ours", "dattri"))
    fm = functional_model(models[0].eval(), task.loss_fn)
    method = grad_dot(fm)
    bs = hp["batch_size"]
    train = [(task.x_train[i:i + bs], task.y_train[i:i + bs]) for i in range(0, n_train, bs)]
    test = (task.x_test, task.y_test)
    stacked = {k: v[None] for k, v in fm.params.items()}
    head = batch_slice(train[0], 0, 3)
    plan = layer_plan(fm)
    checked = _check(plan, stacked, head)[0]
    merged = batch_cat([test, *train])
    state = method.prepare(fm.params, train)
    lg = _factored(checked, stacked, merged)[0]
    test_rows, train_rows = lg.rows(0, n_test), lg.rows(n_test, lg.num_rows)

    def blocks():
        off = 0
        for b in train:
            train_rows.rows(off, off + b[0].shape[0]).scores(test_rows)
            off += b[0].shape[0]

    def bare():
        live = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
        with torch.enable_grad():
            out = torch.func.functional_call(fm.module, {**fm.fixed, **live}, (merged[0],))
            loss = torch.nn.functional.cross_entropy(out, merged[1], reduction="sum")
            return torch.autograd.grad(loss, list(live.values()))

    parts = {
        "dattri prepare+score": lambda: theirs.score(theirs.prepare()),
        "ours prepare+score": lambda: ours.score(ours.prepare()),
        "ours prepare": lambda: method.prepare(fm.params, train),
        "  check: autodiff rows (3)": lambda: _example_rows(fm, fm.params, head, False),
        "  check: factored pass (3)": lambda: _factored(checked, stacked, head),
        "  check: pass + 3 rows, one engine call": lambda: _factored_and_rows(plan, stacked, head, False),
        "  check: pass + rows 0, 2 + sums, one call": lambda: _factored_and_rows(
            plan, stacked, head, False, 3, ref_at=(0, 2)),
        "  check (whole)": lambda: _check(plan, stacked, head),
        "ours score": lambda: method.score(fm.params, state, train, test),
        f"  one capture pass ({lg.num_rows})": lambda: _factored(checked, stacked, merged),
        f"  one pass via mlp_io ({lg.num_rows}, as score takes it)": lambda: _plain_mlp(
            checked, stacked, merged),
        "  score blocks": blocks,
        f"bare fwd+bwd ({lg.num_rows}, no capture)": bare,
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for fn in parts.values():
        fn()
    for _ in range(rounds):
        for k, fn in parts.items():
            t0 = time.thread_time()
            fn()
            times[k].append(1e3 * (time.thread_time() - t0))
    ref = statistics.median(times["dattri prepare+score"])
    print(f"{task_name} grad-dot {n_train} x {n_test}: median thread CPU ms of {rounds} "
          f"interleaved rounds, share of dattri's prepare+score")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"  {k:36s} {med:8.3f}  {med / ref:6.3f}")


def gpt2(repeats: int, profile: bool) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from dattri_fn.model import functional_model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    model = GPT2LMHeadModel(cfg).eval()

    def loss_fn(out, target):
        logits = out.logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target[:, 1:].reshape(-1))

    fm = functional_model(model, loss_fn)
    x = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    engine, bare = _engine_calls(fm, (x, x), kinds=("conv1d",))
    print(f"gpt2 tiny (2 layers, width 64), 16 x 32 tokens, median CPU ms of {repeats} warm calls")
    print(f"  engine batched_io  {_median_ms(engine, repeats):7.3f}")
    print(f"  bare fwd+bwd       {_median_ms(bare, repeats):7.3f}")
    if profile:
        _profile(engine)


def _profile(fn) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capture_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--gpt2", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--floor", action="store_true")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.floor:
        floor(args.task, args.rounds)
    elif args.gpt2:
        gpt2(args.repeats, args.profile)
    else:
        digits(args.task, args.repeats, args.profile)


if __name__ == "__main__":
    main()
