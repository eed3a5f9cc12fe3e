"""LayerNorms in the layer plan (issue 14): Grad-Dot and TRAK with a model's default params, one
checkout against another (``--base``, e.g. the same tree with the layer plan of before), interleaved.

Each round runs one subprocess per checkout, alternating (base, ours, base, ours, ...); a
subprocess imports ``dattri_fn`` from its checkout, warms every arm up once and reports each
arm's thread CPU time (one thread, float32):

* ``gpt2-dot`` / ``gpt2-trak``: a stock tiny GPT-2 (``--vocab``, ``--embd``, ``--layers``),
  ``--n`` x ``--T`` tokens with every 4th sequence padded (vmap refuses the model), every param:
  ``grad_dot`` score (8 test rows) and ``trak(proj_dim=64)`` prepare + score. The tied
  ``wte``/``lm_head`` took a per-example loop before ties were captured (6c822d2, with the
  LayerNorms); since bdee2db it comes from the one capture pass, as the sum of both uses' rows.
* ``gpt2-kdot`` / ``gpt2-ktrak``: the same GPT-2 with ``projection="kronecker"``
  (``proj_dim=16`` per side): ``grad_dot`` score and ``trak`` prepare + score. The tied ``wte``
  is the ``[V, D]`` Embedding's Kronecker block in 6c822d2 and again since review R4 F2; between
  bdee2db and that fix its ``V D`` rows went to the dense rest projection (``V D k^2`` per row).
* ``gpt2nowte-dot`` / ``gpt2nowte-trak``: the same with every param but the tied ``wte``.
* ``mlp-dot`` / ``mlp-trak``: x [n, 64] -> LayerNorm -> Linear(64, 128) -> ReLU -> LayerNorm ->
  Linear(128, 10), ``--mlp-n`` train and 64 test rows, batches of 128: ``grad_dot`` score and
  ``trak(proj_dim=256)`` prepare + score.

Run: ``OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python -m benchmarks.norm_plan_ab --base <tree>
--rounds 3`` (~1-2 CPU-minutes); ``--arms gpt2-kdot,gpt2-ktrak --vocab 8000 --embd 64 --layers 1
--n 16 --T 16`` is review R4's F2 case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ARMS = ("gpt2-dot", "gpt2-trak", "gpt2nowte-dot", "gpt2nowte-trak", "mlp-dot", "mlp-trak",
        "gpt2-kdot", "gpt2-ktrak")


def _child(a) -> dict:
    import torch
    import transformers
    from torch import nn

    from dattri_fn import functional_model
    from dattri_fn.attribute import grad_dot, trak
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.losses import causal_lm_loss, causal_lm_margin

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cfg = transformers.GPT2Config(vocab_size=a.vocab, n_positions=a.T, n_embd=a.embd,
                                  n_layer=a.layers, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.n, a.T), generator=g)
    mask = torch.ones(a.n, a.T, dtype=torch.long)
    mask[::4, a.T // 2:] = 0  # every fourth sequence right-padded: vmap refuses the model
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    lm_train = [{k: v[i:i + 16] for k, v in batch.items()} for i in range(0, a.n, 16)]
    lm_test = {k: v[:8] for k, v in batch.items()}
    nowte = lambda n: "wte" not in n
    lm = {"gpt2": (functional_model(gpt2, causal_lm_loss), functional_model(gpt2, causal_lm_margin)),
          "gpt2nowte": (functional_model(gpt2, causal_lm_loss, params=nowte),
                        functional_model(gpt2, causal_lm_margin, params=nowte))}
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.ReLU(), nn.LayerNorm(128),
                        nn.Linear(128, 10)).eval()
    x = torch.randn(a.mlp_n + 64, 64, generator=g)
    y = torch.randint(0, 10, (a.mlp_n + 64,), generator=g)
    mlp_train = [(x[i:i + 128], y[i:i + 128]) for i in range(0, a.mlp_n, 128)]
    mlp_test = (x[a.mlp_n:], y[a.mlp_n:])
    ce = functional_model(mlp, torch.nn.functional.cross_entropy)
    margin = functional_model(mlp, classification_margin_loss)

    def run(arm):
        what, how = arm.split("-")
        if what == "mlp":
            fm, out, train, test, d = ce, margin, mlp_train, mlp_test, 256
        else:
            (fm, out), train, test, d = lm[what], lm_train, lm_test, 64
        if how == "dot":
            return grad_dot(fm).score(fm.params, (), train, test)
        if how == "kdot":
            return grad_dot(fm, proj_dim=16, projection="kronecker").score(fm.params, (), train, test)
        m = (trak(out, proj_dim=16, damping=0.1, projection="kronecker") if how == "ktrak" else
             trak(out, proj_dim=d, damping=0.1))
        return m.score(out.params, m.prepare(out.params, train), train, test)

    res = {}
    for arm in a.arms.split(","):
        run(arm)  # warm-up: first-call costs
        t = time.thread_time()
        run(arm)
        res[arm] = time.thread_time() - t
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the other checkout's root (its dattri_fn is imported)")
    ap.add_argument("--ours", help="this checkout's root (default: the one holding this file)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--embd", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=24)
    ap.add_argument("--mlp-n", type=int, default=2048)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {ARMS}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return
    here = args.ours or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"base": os.path.abspath(args.base), "ours": here} if args.base else {"ours": here}
    sizes = ["--vocab", str(args.vocab), "--embd", str(args.embd), "--layers", str(args.layers),
             "--n", str(args.n), "--T", str(args.T), "--mlp-n", str(args.mlp_n),
             "--arms", args.arms]
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS):
        ap.error(f"--arms: expected names among {ARMS}, got {arms}")
    # run as a script: its sys.path[0] is this folder, and dattri_fn comes from PYTHONPATH
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *sizes]
    times = {k: {arm: [] for arm in arms} for k in roots}
    for _ in range(args.rounds):
        for k, root in roots.items():
            env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
            res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                 check=True)
            for arm, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
                times[k][arm].append(v)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"checkouts {roots}")
    print(f"GPT-2 vocab={args.vocab} n_embd={args.embd} n_layer={args.layers}, {args.n} x "
          f"{args.T} tokens (every 4th padded); LayerNorm MLP {args.mlp_n} train rows; float32, "
          f"1 thread; loadavg {load}")
    med = {k: {arm: statistics.median(v) for arm, v in t.items()} for k, t in times.items()}
    for arm in arms:
        line = "  ".join(f"{k} {med[k][arm]:.3f}" for k in roots)
        if "base" in med:
            line += f"  ours/base {med['ours'][arm] / med['base'][arm]:.2f}"
        print(f"{arm:15s} CPU s (median of {args.rounds}): {line}")
    for k in roots:
        print(f"{k} rounds: {times[k]}")


if __name__ == "__main__":
    main()
