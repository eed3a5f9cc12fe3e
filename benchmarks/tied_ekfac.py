"""EK-FAC with GPT-2's tied wte = lm_head (issue 16): what the pooled layer costs and what
leaving out the embedding's share (kronfluence tracks the Linear head only) would change.

A small stock GPT-2 (local config, default attention, float32, one thread):

* CPU time of ``influence(fm, solver="ekfac")`` ``prepare`` + ``score`` with params = every
  Conv1D (the tie left out) against every Conv1D + ``transformer.wte`` (pooled) and against
  every parameter (``functional_model``'s default: wpe and the LayerNorms then take the exact
  Fisher diagonal block, :mod:`dattri_fn.operators.kfac_diag`), interleaved over ``--rounds``
  rounds (thread CPU time, median);
* the embedding use's share of the tied weight's per-example gradient,
  ``||DW_emb|| / ||DW_emb + DW_head||`` (captured with ``tap(tied=True)``), and the relative
  error of a ``Lambda`` built from the head's share alone against the exact one, in the same
  pooled eigenbasis.

* ``--pooled-ab``: CPU time of ``ekfac_factors`` on the tied weight alone with the pooled
  statistics from token counts / gathered rows of ``Q_G`` (:class:`~dattri_fn.operators.
  kfac_tied.PooledParts`, the library's path) against the materialised one-hot "out" vectors
  (``pooled_io``, the path before stop 20, forced here by wrapping ``tied_steps``),
  interleaved, and the largest difference of their K-FAC factors.

Run: ``nice -n 15 .venv/bin/python -m benchmarks.tied_ekfac`` (~1 CPU-minute).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _setup(vocab: int, embd: int, layers: int, n: int, T: int):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=T, n_embd=embd, n_layer=layers,
                                  n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::4, T // 2:] = 0  # every fourth sequence right-padded
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return model, batch


_PICKS = {"conv1d": lambda k: ".c_" in k,
          "conv1d+wte": lambda k: ".c_" in k or k == "transformer.wte.weight",
          "every": None}


def _time(model, batch, test, arm: str) -> float:
    from dattri_fn import functional_model
    from dattri_fn.attribute import influence
    from dattri_fn.losses import causal_lm_loss

    fm = functional_model(model, causal_lm_loss, params=_PICKS[arm])
    m = influence(fm, solver="ekfac", damping=0.1)
    t = time.thread_time()
    state = m.prepare(fm.params, batch)
    m.score(fm.params, state, batch, test)
    return time.thread_time() - t


def _shares(model, batch):
    """(mean ||DW_emb|| / ||DW||, relative error of the head-only Lambda) on ``batch``."""
    from dattri_fn.losses import causal_lm_loss
    from dattri_fn.operators.kfac import ekfac_factors
    from dattri_fn.transforms.capture import tap, weight_grad
    from dattri_fn.transforms.layers import batched_io

    key = "transformer.wte.weight"
    W = model.transformer.wte.weight.detach()
    ef = ekfac_factors(model, causal_lm_loss, {key: W}, batch)
    qa, qg = ef.QA["transformer.wte"], ef.QG["transformer.wte"]
    tapped = tap(model, ["transformer.wte", "lm_head"], tied=True)
    state = {k: v.detach() for k, v in model.named_parameters()}
    io = batched_io(tapped, causal_lm_loss, state, (), {k: v for k, v in batch.items()
                                                        if k != "labels"},
                    batch["labels"], None, W)
    parts = {n: weight_grad(tapped.specs[n], *io[n], W.shape) for n in io}
    total = parts["transformer.wte"] + parts["lm_head"]
    share = (parts["transformer.wte"].flatten(1).norm(dim=1)
             / total.flatten(1).norm(dim=1)).mean()
    head_only = (qg.T @ parts["lm_head"] @ qa).square().mean(0)
    exact = (qg.T @ total @ qa).square().mean(0)
    return float(share), float((head_only - exact).norm() / exact.norm()), \
        float((ef.Lambda["transformer.wte"] - exact).norm() / exact.norm())


def _pooled_ab(model, batch, rounds: int) -> None:
    """Interleaved CPU time of ekfac_factors on the tied weight: counts path vs one-hot path."""
    from dattri_fn.losses import causal_lm_loss
    from dattri_fn.operators import kfac_stats
    from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

    key = "transformer.wte.weight"
    params = {key: model.transformer.wte.weight.detach()}
    counts_steps = kfac_stats.tied_steps

    def one_hot_steps(tapped, step, on_input=None, pooled=None):
        return counts_steps(tapped, step, on_input)  # pooled_io's materialised one-hot rows

    def run(one_hot: bool):
        kfac_stats.tied_steps = one_hot_steps if one_hot else counts_steps
        try:
            t = time.thread_time()
            f = ekfac_factors(model, causal_lm_loss, params, batch)
            return time.thread_time() - t, f
        finally:
            kfac_stats.tied_steps = counts_steps

    run(False)
    run(True)
    times = {False: [], True: []}
    for _ in range(rounds):
        for one_hot in (False, True):
            times[one_hot].append(run(one_hot)[0])
    # the factors themselves (float32 eigenbases of near-degenerate G differ by rounding)
    kf_a = kfac_factors(model, causal_lm_loss, params, batch)
    kfac_stats.tied_steps = one_hot_steps
    try:
        kf_b = kfac_factors(model, causal_lm_loss, params, batch)
    finally:
        kfac_stats.tied_steps = counts_steps
    diff = max(float((getattr(kf_a, f)[k] - getattr(kf_b, f)[k]).abs().max()
                     / getattr(kf_b, f)[k].abs().max()) for f in ("A", "G") for k in kf_a.A)
    c, o = statistics.median(times[False]), statistics.median(times[True])
    print(f"ekfac_factors on the tied wte alone, CPU s (median of {rounds}): counts "
          f"{c:.3f}, one-hot {o:.3f} ({c / o:.2f}x); K-FAC A, G max relative difference "
          f"{diff:.1e}; rounds {times}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--embd", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pooled-ab", action="store_true", help="only the counts/one-hot A/B")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, batch = _setup(args.vocab, args.embd, args.layers, args.n, args.T)
    if args.pooled_ab:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"GPT-2 vocab={args.vocab} n_embd={args.embd} n_layer={args.layers}, {args.n} x "
              f"{args.T} tokens, float32, 1 thread; loadavg {' '.join(load)}")
        _pooled_ab(model, batch, args.rounds)
        return
    test = {k: v[:8] for k, v in batch.items()}
    times = {arm: [] for arm in _PICKS}
    _time(model, batch, test, "every")  # warm-up (imports, first-call costs)
    for _ in range(args.rounds):
        for arm in _PICKS:
            times[arm].append(_time(model, batch, test, arm))
    a, b, c = (statistics.median(times[arm]) for arm in _PICKS)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"GPT-2 vocab={args.vocab} n_embd={args.embd} n_layer={args.layers}, {args.n} train x "
          f"{args.T} tokens, 8 test, float32, 1 thread; loadavg {' '.join(load)}")
    print(f"EK-FAC prepare+score CPU s (median of {args.rounds}): Conv1D only {a:.2f}, "
          f"+ tied wte {b:.2f} ({b / a:.2f}x), every param {c:.2f} ({c / a:.2f}x; wpe and "
          f"LayerNorms diagonal); rounds {times}")
    share, head_err, own_err = _shares(model, batch)
    print(f"embedding use's share of the tied weight's per-example gradient norm: {share:.3f}")
    print(f"Lambda from the head's share only (kronfluence's tracked lm_head), relative error "
          f"against the exact Lambda in the pooled basis: {head_err:.3f} (ours: {own_err:.1e})")


if __name__ == "__main__":
    main()
