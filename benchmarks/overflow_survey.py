"""Survey (stop 25, engineer F): what each method does with an overflowing or NaN example.

    OMP_NUM_THREADS=1 python -m benchmarks.overflow_survey [--methods if-cg,trak,...]

A 4-8-3 MLP (``--act relu``, default, or ``tanh``, which saturates: the huge example's gradient
is then 0 and every method is right) in float32, cross-entropy, 16 train and 4 test (seed 0). Cases:
``clean``, ``train-huge`` (training example 2's input times 1e20, relabelled to its least
likely class: logits ~1e20, a finite gradient ~1e20 whose squared norm ~1e40 overflows float32),
``test-huge`` (test example 1 likewise), ``train-nan`` (a NaN in training example 2's input).
Each method runs ``prepare`` on the (bad) train and ``score`` /
``self_score``; the outcome is printed per case:

* ``refused``: a ValueError/TypeError (its first words printed), what a user should get;
* ``FINITE, MATCHES / DIFFERS FROM float64``: finite scores, compared entrywise with the same
  method on the same model and data in float64 (where nothing overflows); DIFFERS on a bad
  case but MATCHES on ``clean`` = a silently wrong answer;
* ``NON-FINITE``: scores with NaN/inf returned without a word;
* ``error``: another exception (a crash deeper in, not a refusal naming the argument).

LESS, SOURCE and DVEmb read a training run recorded on the CLEAN data (the model trained fine);
the bad example is then given to ``prepare`` (as a user valuing a corrupted copy would).
MAGIC replays the training itself on the given data.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.model import functional_model

SCALE = 1e20


def _problem(act: str, dtype):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh() if act == "tanh" else nn.ReLU(),
                        nn.Linear(8, 3)).to(dtype)
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(16, 4, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)
    xt, yt = torch.randn(4, 4, generator=g).to(dtype), torch.randint(0, 3, (4,), generator=g)
    return fm, net, (x, y), (xt, yt)


def _record(fm, data, kind: str, tmp: str):
    from dattri_fn.training import (
        GradSpec,
        adamw,
        batch_order,
        finish_record,
        make_step,
        record_step,
        sgd,
        start_record,
        take,
    )
    opt = sgd(0.1) if kind == "sgd" else adamw(1e-2)
    order = batch_order(16, batch_size=4, epochs=2, seed=0)
    step = make_step(fm, opt)
    params, state = fm.params, opt.init(fm.params)
    grads = GradSpec(fm.loss, tmp, None) if kind == "sgd" else None
    rec = start_record(kind, checkpoint_every=2, grads=grads)
    for rows in order:
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=0.1 if kind == "sgd" else 1e-2, params=params,
                          opt_state=state, batch=batch)
        params, state = step(params, state, batch, torch.ones(len(rows)))
    return finish_record(rec, params=params, opt_state=state)


def _methods(fm, net, clean, tmp):
    """name -> (method, params) built lazily (a constructor may itself fail)."""
    from dattri_fn.attribute import (
        dvemb,
        factgrass,
        influence,
        less,
        logra,
        magic,
        representer,
        source,
        tracin,
        trak,
    )
    from dattri_fn.training import sgd

    out = {}
    # Arnoldi over the whole space (max_iter = P): its float32 and float64 runs then find the
    # same top 8 eigenpairs; a 16-step Krylov space (the default 2 * rank) is unconverged, and
    # its two runs differed on clean data (review RF, stop 25), which is no overflow's doing
    P = sum(v.numel() for v in fm.params.values())
    for solver, kw in (("explicit", {}), ("cg", {}), ("minres", {}), ("lissa", {"scale": 10.0}),
                       ("arnoldi", {"rank": 8, "max_iter": P}), ("datainf", {}), ("kfac", {}),
                       ("ekfac", {})):
        out[f"influence-{solver}"] = (lambda s=solver, k=kw: influence(fm, solver=s, damping=0.1,
                                                                        **k), lambda: fm.params)
    out["trak"] = (lambda: trak(fm, proj_dim=8), lambda: fm.params)
    out["tracin"] = (lambda: tracin(fm, lrs=[0.1, 0.1]), lambda: [fm.params, fm.params])

    def feats(params, x):
        return torch.func.functional_call(net[:2], {k: v for k, v in params.items()
                                                     if k.startswith("0.")}, (x,), strict=True)

    def head(params, h):
        return h @ params["2.weight"].T + params["2.bias"]

    out["rps"] = (lambda: representer(lambda p, ex: feats(p, ex[0]), head,
                                      lambda lo, y: F.cross_entropy(lo[None], y[None]), l2=0.1),
                  lambda: fm.params)
    out["logra"] = (lambda: logra(fm, proj_dim=4, damping=0.1), lambda: fm.params)
    out["factgrass"] = (lambda: factgrass(fm, proj_dim=8, blowup=2, damping=0.1),
                        lambda: fm.params)
    rec = {}

    def record(kind):
        if kind not in rec:
            rec[kind] = _record(fm, clean, kind, tmp)
        return rec[kind]
    out["less"] = (lambda: less(fm), lambda: record("adamw"))
    out["source"] = (lambda: source(fm, segments=2), lambda: record("sgd"))
    out["dvemb"] = (lambda: dvemb(fm), lambda: record("sgd"))
    out["magic"] = (lambda: magic(fm, sgd(0.1), epochs=2, batch_size=4),
                    lambda: fm.params)
    return out


def _outcome(fn, ref) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
    except (ValueError, TypeError) as e:
        return f"refused: {type(e).__name__}: {str(e)[:240]}"
    except Exception as e:  # noqa: BLE001 - the survey reports whatever happens
        return f"error: {type(e).__name__}: {str(e)[:150]}"
    t = out.values if hasattr(out, "values") and not isinstance(out, torch.Tensor) else out
    if bool(torch.isfinite(t).all()):
        try:
            r = ref()
            r = r.values if hasattr(r, "values") and not isinstance(r, torch.Tensor) else r
            t, r = t.detach().double(), r.detach().double()
            # entrywise, so that the huge example's entries do not hide the others'
            floor = 1e-3 * float(r.abs().median()) + 1e-30
            gap = float(((t - r).abs() / (r.abs() + floor)).max())
            return (f"FINITE, {'MATCHES' if gap < 1e-3 else 'DIFFERS FROM'} float64 "
                    f"(max entrywise rel. gap {gap:.2g}, max |s| {float(r.abs().max()):.2g})")
        except Exception as e:  # noqa: BLE001
            return f"FINITE (float64 reference failed: {type(e).__name__}: {str(e)[:80]})"
    return f"NON-FINITE (silent: {int((~torch.isfinite(t)).sum())} entries)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=None)
    ap.add_argument("--act", default="relu", choices=("relu", "tanh"))
    args = ap.parse_args()
    fm, net, (x, y), (xt, yt) = _problem(args.act, torch.float32)
    fm64, net64, _, _ = _problem(args.act, torch.float64)
    huge, nan = x.clone(), x.clone()
    huge[2] *= SCALE
    nan[2, 0] = float("nan")
    thuge = xt.clone()
    thuge[1] *= SCALE
    with torch.no_grad():  # a wrong label where the logits are ~1e20: a gradient ~1e20, not 0
        y, yt = y.clone(), yt.clone()
        y[2] = net(huge[2:3]).argmin()
        yt[1] = net(thuge[1:2]).argmin()
    cases = {"clean": ((x, y), (xt, yt)), "train-huge": ((huge, y), (xt, yt)),
             "test-huge": ((x, y), (thuge, yt)), "train-nan": ((nan, y), (xt, yt))}
    d64 = torch.float64
    print(f"model: 4-8-3 {args.act} MLP, float32; reference: the same in float64")
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp64:
        methods = _methods(fm, net, (x, y), tmp)
        methods64 = _methods(fm64, net64, (x.to(d64), y), tmp64)
        chosen = args.methods.split(",") if args.methods else list(methods)
        for name in chosen:
            for case, (train, test) in cases.items():
                def run(step, table, dtype, train=train, test=test, name=name):
                    make, params_of = table[name]
                    tr = (train[0].to(dtype), train[1])
                    te = (test[0].to(dtype), test[1])
                    m, p = make(), params_of()
                    st = m.prepare(p, tr)
                    if step == "score":
                        return m.score(p, st, tr, te)
                    return m.self_score(p, st, tr)
                res = {s: _outcome(lambda s=s: run(s, methods, torch.float32),
                                   lambda s=s: run(s, methods64, d64))
                       for s in ("score", "self_score")}
                if case in ("test-huge", "clean"):
                    res.pop("self_score")
                for step, r in res.items():
                    print(f"{name:18s} {case:10s} {step:10s} {r}", flush=True)


if __name__ == "__main__":
    main()
