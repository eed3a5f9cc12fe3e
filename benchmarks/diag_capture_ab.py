"""Every-param K-FAC/EK-FAC on a stock tiny GPT-2 (wpe and LayerNorms in the diagonal block):
this checkout against another one (``--base``, e.g. a worktree of the commit before the
capture of LayerNorm / broadcast position embeddings), interleaved.

Each round runs one subprocess per checkout, alternating (base, ours, base, ours, ...); a
subprocess imports ``dattri_fn`` from its checkout, warms every arm up once and reports the
thread CPU time of each arm (one thread, float32):

* ``kfac`` / ``ekfac``: ``kfac_factors`` / ``ekfac_factors`` with every param, others="diagonal";
* ``ekfac-tied``: ``ekfac_factors`` with the Conv1Ds and the tied wte only (no diagonal block),
  the reference the every-param run is compared with;
* ``if-ekfac``: ``influence(fm, solver="ekfac")`` ``prepare`` + ``score`` (8 test rows), every param.

Run: ``OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python -m benchmarks.diag_capture_ab
--base /tmp/base --rounds 3`` (~2 CPU-minutes).
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

ARMS = ("kfac", "ekfac", "ekfac-tied", "if-ekfac")


def _child(vocab: int, embd: int, layers: int, n: int, T: int) -> dict:
    import torch
    import transformers

    from dattri_fn import functional_model
    from dattri_fn.attribute import influence
    from dattri_fn.losses import causal_lm_loss
    from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=T, n_embd=embd, n_layer=layers,
                                  n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::4, T // 2:] = 0  # every fourth sequence right-padded: vmap refuses the model
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    test = {k: v[:8] for k, v in batch.items()}
    every = {k: v.detach() for k, v in model.named_parameters()}
    tied = {k: v for k, v in every.items() if ".c_" in k or k == "transformer.wte.weight"}
    fm = functional_model(model, causal_lm_loss)

    def run(arm):
        if arm == "kfac":
            return kfac_factors(model, causal_lm_loss, every, batch, others="diagonal")
        if arm == "ekfac":
            return ekfac_factors(model, causal_lm_loss, every, batch, others="diagonal")
        if arm == "ekfac-tied":
            return ekfac_factors(model, causal_lm_loss, tied, batch)
        m = influence(fm, solver="ekfac", damping=0.1)
        return m.score(fm.params, m.prepare(fm.params, batch), batch, test)

    out = {}
    for arm in ARMS:
        run(arm)  # warm-up: first-call costs
        t = time.thread_time()
        run(arm)
        out[arm] = time.thread_time() - t
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the other checkout's root (its dattri_fn is imported)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--embd", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=24)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = (args.vocab, args.embd, args.layers, args.n, args.T)
    if args.child:
        print(json.dumps(_child(*sizes)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"base": os.path.abspath(args.base), "ours": here} if args.base else {"ours": here}
    # run as a script: its sys.path[0] is this folder, and dattri_fn comes from PYTHONPATH
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--vocab",
           str(args.vocab), "--embd", str(args.embd), "--layers", str(args.layers), "--n",
           str(args.n), "--T", str(args.T)]
    times = {k: {arm: [] for arm in ARMS} for k in roots}
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
          f"{args.T} tokens (every 4th padded), float32, 1 thread; loadavg {load}")
    med = {k: {arm: statistics.median(v) for arm, v in t.items()} for k, t in times.items()}
    for arm in ARMS:
        line = "  ".join(f"{k} {med[k][arm]:.3f}" for k in roots)
        if "base" in med:
            line += f"  ours/base {med['ours'][arm] / med['base'][arm]:.2f}"
        print(f"{arm:11s} CPU s (median of {args.rounds}): {line}")
    for k in roots:
        print(f"{k}: every-param EK-FAC factors / tied-only = "
              f"{med[k]['ekfac'] / med[k]['ekfac-tied']:.2f}x; rounds {times[k]}")


if __name__ == "__main__":
    main()
