"""Thread CPU time of one MAGIC reverse step: reverse-over-reverse (``vjp`` of the step and a
vmapped pullback, the recipes' route) against forward-over-reverse (:func:`transpose_step`).

    OMP_NUM_THREADS=1 python -m benchmarks.magic_fwd --task text-lm --at 40 --rounds 7
    OMP_NUM_THREADS=1 python -m benchmarks.magic_fwd --task digits-cnn --at 40 --fwd-chunk 0

A step ``(theta', s') = U(g, s, theta)`` of :func:`~dattri_fn.training.make_step`, ``g = grad
L_w(theta)``, ``L_w = (1/B) sum_i w_i l_i``, pulls a cotangent back as ``(gbar, sbar,
thetabar_U) = vjp(U)`` (elementwise optimizer algebra), ``thetabar = thetabar_U + H gbar``,
``wbar_i = <grad l_i, gbar> / B``; ``H`` is symmetric, so ``H gbar`` and every ``<grad l_i,
gbar>`` come from ONE ``jvp`` of ``theta -> (grad L_w, l(theta))`` along ``gbar``, vmapped over
the ``k`` cotangents (the primal once per vmapped call). Equal to ``vjp`` of the step in exact
arithmetic (``--float64`` prints the difference).

One run of the task (model 0; text-lm its full-batch Adam, the digits tasks ``SGD_HPARAMS``),
the state before step ``--at``, the ``k`` test targets' cotangents pulled back through that
step by each route, the order rotated every round: ``vjp`` (the recipes' ``vjp_step``: text-lm
``make_step`` with coupled decay, digits-cnn the GEMM conv and mask ReLUs; ``--chunk``, default
the recipe's ``MAGIC_CHUNKS``), ``fwd`` (the same step transposed; ``--fwd-chunk``, default
``--chunk``; 0: all at once) and ``fwd_g`` (``fwd`` handed ``g`` from outside the timed region:
its bound if ``g`` were read off the recorded states for free). Prints each route's ms per
round, medians, the medians of the per-round ratios to ``vjp``, and the largest difference of
the weight and state cotangents (each leaf) from ``vjp``'s relative to their largest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap


def transpose_step(loss, optimizer) -> Callable:
    """Return ``(params, opt_state, batch, weights, chunk_size, g=None) -> pullback``, the
    pullback ``bar -> (bar, wbar)`` of ``make_step(loss, optimizer)`` by forward-over-reverse on
    the floating leaves of ``(params, opt_state)`` (``metagradient._split`` order), batched over
    a leading ``k``. ``loss``: a FunctionalModel with the default tuple batches."""
    from dattri_fn.attribute.metagradient import _join, _split
    from dattri_fn.training.steps import model_losses

    per_example = model_losses(loss)

    def pullback(params, opt_state, batch, weights, chunk_size=None, g=None):
        floats, how = _split((params, opt_state))
        names = list(params)

        def objective(p):
            losses = per_example(p, batch)  # [B]
            return (weights.to(losses.dtype) * losses).sum() / losses.shape[0], losses

        if g is None:
            g, _ = grad(objective, has_aux=True)(params)

        def update(g, floats_t):
            p, s = _join(floats_t, how)
            return _split(optimizer.update(g, s, p))[0]

        _, update_pb = vjp(update, g, floats)

        def one(bar: list[Tensor]):
            gbar, fbar = update_pb(bar)
            _, (hvp, dl) = jvp(grad(objective, has_aux=True), (params,), (gbar,))
            out = [b + hvp[n] for b, n in zip(fbar[:len(names)], names, strict=True)]
            return out + list(fbar[len(names):]), dl / dl.shape[0]

        return vmap(one, chunk_size=chunk_size)

    return pullback


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_fwd",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="text-lm",
                   choices=("digits-lr", "digits-mlp", "digits-cnn", "text-lm"))
    p.add_argument("--at", type=int, default=40, help="the step pulled back through")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--chunk", type=int, default=None, help="default: the recipe's MAGIC_CHUNKS")
    p.add_argument("--fwd-chunk", type=int, default=None,
                   help="chunk of the forward-over-reverse routes (default --chunk; 0: all)")
    p.add_argument("--n-train", type=int, default=None, help="default 500 (text-lm 128)")
    p.add_argument("--n-test", type=int, default=None, help="default 50 (text-lm 16)")
    p.add_argument("--float64", action="store_true", help="the model and data in float64")
    args = p.parse_args(argv)
    lm = args.task == "text-lm"
    args.n_train = args.n_train or (128 if lm else 500)
    args.n_test = args.n_test or (16 if lm else 50)
    return args


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def setup(args) -> dict:
    """The task's state before step ``--at``, its batch, and both routes' steps."""
    from dattri_fn.app.recipes import MAGIC_CHUNKS, _gemm_vjp_step, _is_classification
    from dattri_fn.attribute.metagradient import _split
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.tasks import SGD_HPARAMS, adam_run, get_task, sgd_run, task_step
    from dattri_fn.model import functional_model
    from dattri_fn.training import adam, cosine_schedule, make_step, take
    from dattri_fn.training.run import run_steps
    from dattri_fn.training.steps import model_losses

    hparams = None if args.task == "text-lm" else dict(SGD_HPARAMS)
    task = get_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=0, hparams=hparams)
    hp = task.hparams
    model = task.make_model(0)
    if args.float64:
        model = model.double()
    fm = functional_model(model, task.loss_fn)
    wd = float(hp.get("weight_decay", 0.0))
    if hp["optimizer"] == "sgd":
        opt, order = sgd_run(task.n_train, seed=0, epochs=hp["epochs"], lr=hp["lr"],
                             weight_decay=wd, batch_size=hp["batch_size"],
                             momentum=hp["momentum"])
        step, same = make_step(fm, opt), opt
    else:
        opt, order = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
        step = task_step(fm, opt, wd)
        same = adam(cosine_schedule(hp["lr"], hp["epochs"], recursive=True), weight_decay=wd)
    vjp_step, twin = _gemm_vjp_step(model, task.loss_fn, same), fm
    if vjp_step is not None:
        from dattri_fn.training.gemm_conv import with_gemm_convs
        from dattri_fn.training.mask_relu import with_mask_relus

        twin = functional_model(with_mask_relus(with_gemm_convs(model, ["0"])), task.loss_fn)
    else:
        vjp_step = make_step(fm, same)
    x, xt = task.x_train, task.x_test
    if args.float64 and x.is_floating_point():
        x, xt = x.double(), xt.double()
    data = (x, task.y_train)
    dtype = next(iter(fm.params.values())).dtype
    weights = torch.ones(task.n_train, dtype=dtype)
    at = min(args.at, len(order) - 1)
    state = run_steps(step, (fm.params, opt.init(fm.params)), data, order, weights, 0, at)
    if _is_classification(task):
        target = functional_model(model, classification_margin_loss).loss
    else:
        target = lambda p, ex: -fm.loss(p, ex)
    cot = vmap(grad(target), in_dims=(None, 0))(state[0], (xt, task.y_test))
    zeros = [torch.zeros(len(xt), *f.shape, dtype=f.dtype) for f in _split(state[1])[0]]
    chunk = args.chunk if args.chunk is not None else MAGIC_CHUNKS.get(args.task)
    fwd_chunk = chunk if args.fwd_chunk is None else (args.fwd_chunk or None)
    batch, w = take(data, order[at]), weights[order[at]]
    per_example = model_losses(twin)

    def objective(p):
        losses = per_example(p, batch)
        return (w * losses).sum() / losses.shape[0]

    return dict(state=state, batch=batch, w=w, bar=[cot[n] for n in state[0]] + zeros,
                vjp_step=vjp_step, transpose=transpose_step(twin, same), chunk=chunk,
                fwd_chunk=fwd_chunk, g=grad(objective)(state[0]))


def reverse_vjp(s: dict):
    """The recipes' route: metagradient._sweep's vjp + vmapped pullback."""
    from dattri_fn.attribute.metagradient import _join, _split

    floats, how = _split(s["state"])

    def one_step(floats_t, w_rows):
        params, opt_state = _join(floats_t, how)
        return _split(s["vjp_step"](params, opt_state, s["batch"], w_rows))[0]

    _, pullback = vjp(one_step, floats, s["w"])
    return vmap(pullback, chunk_size=s["chunk"])(s["bar"])


def reverse_fwd(s: dict, given_g: bool = False):
    return s["transpose"](*s["state"], s["batch"], s["w"], s["fwd_chunk"],
                          s["g"] if given_g else None)(s["bar"])


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    s = setup(args)
    routes = {"vjp": reverse_vjp, "fwd": reverse_fwd, "fwd_g": lambda s: reverse_fwd(s, True)}
    names = list(routes)
    ms: dict[str, list[float]] = {n: [] for n in names}
    got = {name: route(s) for name, route in routes.items()}  # warm-up, untimed
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            t0 = time.thread_time()
            got[name] = routes[name](s)
            ms[name].append((time.thread_time() - t0) * 1e3)
    rel = lambda a, b: float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))
    (sa, wa) = got["vjp"]
    row = {"task": args.task, "at": args.at, "k": len(s["bar"][0]), "chunk": s["chunk"],
           "fwd_chunk": s["fwd_chunk"], "dtype": str(wa.dtype), "load": load_avg()}
    for name in names:
        row[f"{name}_ms"] = [round(v, 1) for v in ms[name]]
        row[f"{name}_median"] = round(statistics.median(ms[name]), 1)
        if name != "vjp":
            row[f"{name}/vjp"] = round(statistics.median(
                [b / a for a, b in zip(ms["vjp"], ms[name], strict=True)]), 3)
            sb, wb = got[name]
            row[f"{name}_weights_rel_diff"] = rel(wa, wb)
            row[f"{name}_state_rel_diff"] = max(rel(a, b) for a, b in zip(sa, sb, strict=True))
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
