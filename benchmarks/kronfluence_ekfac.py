"""EK-FAC influence on a stock Hugging Face Llama: dattri_fn against kronfluence, in one run.

    OMP_NUM_THREADS=1 python -m benchmarks.kronfluence_ekfac            # 512 train x 8 queries
    OMP_NUM_THREADS=1 python -m benchmarks.kronfluence_ekfac --n-train 128 --layers 2
    OMP_NUM_THREADS=1 python -m benchmarks.kronfluence_ekfac --query-rank 8   # low-rank queries

Needs the ``hf`` extra and kronfluence (``pip install --no-deps kronfluence==1.0.1 accelerate
einconv opt-einsum safetensors``; kronfluence is never a dependency of dattri_fn). A local-config
``LlamaForCausalLM`` (default attention, no code changes) is trained briefly on the bundled text
(standard-library docstrings, bytes as tokens); both sides fit EK-FAC with the EMPIRICAL Fisher on
every ``nn.Linear`` of the decoder layers, the same damping, float32, unpadded sequences, and score
``n_test`` queries against ``n_train`` sequences with the summed next-token loss as the
measurement. Each side runs in its own spawned process (time of fit + score, peak RSS above the
process's baseline). Printed: Pearson and Spearman over all scores, top-10 overlap per query,
time and memory ratios (ours / kronfluence). ``--precisions bfloat16,float64`` adds dattri_fn runs
with bfloat16 factors and score products (``influence(..., dtype=torch.bfloat16)``) or a float64
model, each compared with the float32 run (the accuracy cost of bfloat16).

Before/after comparisons in one invocation: ``--baseline DIR`` adds a row measured with another
checkout's ``dattri_fn`` (e.g. ``mkdir /tmp/base && git archive <commit> | tar -x -C /tmp/base``),
and ``--repeats N`` measures every side N times, interleaved (baseline, ours, kronfluence, then
again), printing each run and the mean and range of the ratios; the load average is printed.
Peak RSS on glibc varies by a few MiB between identical runs (freed memory kept or returned),
so compare means over interleaved repeats, not single runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.peak import measure_peak


def _model(layers: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _data(n: int, T: int, seed: int) -> torch.Tensor:
    from dattri_fn.eval.tasks import text_corpus

    ids = torch.tensor([min(ord(c), 127) for c in text_corpus()], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - T, (n,), generator=g)
    return torch.stack([ids[s:s + T] for s in starts.tolist()])


def trained_state(layers: int, T: int, steps: int = 60) -> dict:
    """Train the local-config Llama briefly (Adam, seeded); return its state dict as numpy."""
    model = _model(layers)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = _data(steps * 16, T, seed=1)
    for s in range(steps):
        b = x[s * 16:(s + 1) * 16]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _load(spec: dict):
    model = _model(spec["layers"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in spec["state"].items()})
    return model.eval()


def _tracked(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]


def ours_setup(spec: dict):
    """dattri_fn: influence(fm, solver="ekfac") on the tracked Linear weights."""
    from dattri_fn.attribute import influence
    from dattri_fn.losses import causal_lm_loss
    from dattri_fn.model import functional_model

    model = _load(spec)
    precision = spec.get("precision", "float32")
    if precision == "float64":
        model = model.double()
    keys = {f"{n}.weight" for n in _tracked(model)}
    fm = functional_model(model, causal_lm_loss, params=lambda n: n in keys)
    x_tr, x_te = torch.from_numpy(spec["train"]), torch.from_numpy(spec["test"])
    bs = spec["batch_size"]
    train = [{"input_ids": x_tr[i:i + bs], "labels": x_tr[i:i + bs]}
             for i in range(0, x_tr.shape[0], bs)]
    test = {"input_ids": x_te, "labels": x_te}
    # bfloat16: factors stored and layer-by-layer score products taken in bfloat16
    extra = {"dtype": torch.bfloat16} if precision == "bfloat16" else {}
    if spec.get("query_rank"):  # kronfluence's low-rank query gradients, the same rank
        extra["query_rank"] = spec["query_rank"]
    m = influence(fm, solver="ekfac", damping=spec["damping"], **extra)
    warm = [{"input_ids": x_tr[:4], "labels": x_tr[:4]}]
    m.score(fm.params, m.prepare(fm.params, warm), warm, {"input_ids": x_te[:2], "labels": x_te[:2]})

    def step():
        t0 = time.perf_counter()
        state = m.prepare(fm.params, train)
        S = m.score(fm.params, state, train, test)
        return {"seconds": time.perf_counter() - t0, "scores": S.detach().double().numpy()}

    return step


def baseline_setup(spec: dict):
    """:func:`ours_setup` with the ``dattri_fn`` of the checkout ``spec["baseline"]`` (imported
    first in this fresh process, so no module of the current checkout is mixed in)."""
    if "dattri_fn" in sys.modules:
        raise RuntimeError("baseline_setup: dattri_fn was imported before the baseline path")
    sys.path.insert(0, os.path.abspath(spec["baseline"]))
    import dattri_fn

    where = os.path.dirname(os.path.dirname(os.path.abspath(dattri_fn.__file__)))
    if where != os.path.abspath(spec["baseline"]):
        raise RuntimeError(f"baseline_setup: imported dattri_fn from {where}")
    return ours_setup(spec)


def kron_setup(spec: dict):
    """kronfluence 1.0.1: fit_all_factors(ekfac, empirical Fisher) + compute_pairwise_scores."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.disable(logging.WARNING)
    model = _load(spec)
    tracked = _tracked(model)

    def lm_sum(batch, model):
        logits = model(input_ids=batch["input_ids"]).logits.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                               reduction="sum")

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                raise NotImplementedError("the benchmark compares empirical Fisher only")
            return lm_sum(batch, model)

        def compute_measurement(self, batch, model):
            return lm_sum(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

    class Rows(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return self.x.shape[0]

        def __getitem__(self, i):
            return {"input_ids": self.x[i]}

    task = LMTask()
    model = prepare_model(model, task)
    x_tr, x_te = torch.from_numpy(spec["train"]), torch.from_numpy(spec["test"])
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    # the exact SVD on both sides (kronfluence's default svd_lowrank is randomised)
    score_args = ScoreArguments(damping_factor=spec["damping"],
                                query_gradient_low_rank=spec.get("query_rank"),
                                use_full_svd=True)
    out = tempfile.mkdtemp(prefix="kron_bench_")
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=out)
    bs = spec["batch_size"]

    def run(name, tr, te):
        analyzer.fit_all_factors(factors_name=name, dataset=Rows(tr), per_device_batch_size=bs,
                                 factor_args=factor_args, overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(scores_name=name, factors_name=name,
                                         query_dataset=Rows(te), train_dataset=Rows(tr),
                                         per_device_query_batch_size=te.shape[0],
                                         per_device_train_batch_size=bs, score_args=score_args,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores(name)["all_modules"]

    run("warm", x_tr[:4], x_te[:2])

    def step():
        t0 = time.perf_counter()
        S = run("main", x_tr, x_te)
        return {"seconds": time.perf_counter() - t0, "scores": S.T.detach().double().numpy()}

    return step


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Pearson over all scores and the mean top-10 overlap per query column."""
    a, b = a.double(), b.double()
    pearson = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    k = min(10, a.shape[0])
    overlap = sum(len(set(a[:, j].topk(k).indices.tolist()) & set(b[:, j].topk(k).indices.tolist()))
                  for j in range(a.shape[1])) / (k * a.shape[1])
    return pearson, overlap


def main(argv=None) -> dict:
    from dattri_fn.eval.metrics import spearman

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precisions", default="",
                   help="extra dattri_fn runs, e.g. 'bfloat16,float64': each one's scores against "
                        "the float32 run (Pearson, top-10 overlap), its time and peak")
    p.add_argument("--query-rank", type=int, default=None,
                   help="low-rank query gradients of this rank on both sides (dattri_fn "
                        "query_rank=, kronfluence query_gradient_low_rank= with use_full_svd)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also measure the dattri_fn of this checkout (a 'dattri_fn baseline' "
                        "row, e.g. the code before a change), in the same run")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every side this many times, interleaved")
    args = p.parse_args(argv)
    spec = {"layers": args.layers, "state": trained_state(args.layers, args.context),
            "train": _data(args.n_train, args.context, seed=2).numpy(),
            "test": _data(args.n_test, args.context, seed=3).numpy(),
            "damping": args.damping, "batch_size": args.batch_size,
            "query_rank": args.query_rank}
    res, runs = {}, []
    sides = ((("dattri_fn baseline", baseline_setup),) if args.baseline else ()) + (
        ("dattri_fn", ours_setup), ("kronfluence", kron_setup))
    load = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        for side, setup in sides:
            out = measure_peak(setup, {**spec, "baseline": args.baseline})
            if "error" in out:
                raise SystemExit(f"{side}: {out['error']}")
            r = {"seconds": out["result"]["seconds"], "peak_mib": out["peak_mib"],
                 "scores": torch.from_numpy(out["result"]["scores"])}
            runs.append((rep, side, r))
            res.setdefault(side, r)
        load.append(os.getloadavg()[0])
    for precision in filter(None, args.precisions.split(",")):
        out = measure_peak(ours_setup, {**spec, "precision": precision})
        if "error" in out:
            raise SystemExit(f"dattri_fn {precision}: {out['error']}")
        res[f"dattri_fn {precision}"] = {"seconds": out["result"]["seconds"],
                                         "peak_mib": out["peak_mib"],
                                         "scores": torch.from_numpy(out["result"]["scores"])}
    a, b = res["dattri_fn"]["scores"], res["kronfluence"]["scores"]
    pearson, overlap = _agreement(a, b)
    spear = float(spearman(a.flatten(), b.flatten()))
    k = min(10, a.shape[0])
    n_params = sum(v.size for v in spec["state"].values())
    print(f"\n### EK-FAC on a local-config Llama ({args.layers} layers, {n_params:,} parameters), "
          f"{args.n_train} train x {args.n_test} queries, T={args.context}, damping "
          f"{args.damping:g}, empirical Fisher, float32"
          + (f", query rank {args.query_rank}" if args.query_rank else "") + "\n")
    print("| side | run | fit + score s | peak MiB |")
    print("|---|---|---|---|")
    for rep, side, r in runs:
        print(f"| {side} | {rep + 1} | {r['seconds']:.2f} | {r['peak_mib']:.1f} |")
    for side, r in res.items():
        if side.startswith("dattri_fn ") and side != "dattri_fn baseline":
            print(f"| {side} | 1 | {r['seconds']:.2f} | {r['peak_mib']:.1f} |")
    print(f"\nload average (1 min) over the runs: {min(load):.1f}-{max(load):.1f}")
    ratios = {}
    for num, den in (("dattri_fn", "kronfluence"), ("dattri_fn baseline", "kronfluence"),
                     ("dattri_fn", "dattri_fn baseline")):
        pairs = [(a, b) for (ra, sa, a) in runs for (rb, sb, b) in runs
                 if sa == num and sb == den and ra == rb]
        if not pairs:
            continue
        t = [a["seconds"] / b["seconds"] for a, b in pairs]
        m = [a["peak_mib"] / max(b["peak_mib"], 1e-9) for a, b in pairs]
        ratios[f"{num} / {den}"] = {"time": t, "peak": m}
        print(f"{num} / {den} over {len(pairs)} rounds: time {sum(t) / len(t):.2f}x "
              f"[{min(t):.2f}, {max(t):.2f}], peak {sum(m) / len(m):.2f}x [{min(m):.2f}, {max(m):.2f}]")
    if args.baseline:
        base_s = res["dattri_fn baseline"]["scores"]
        pb, ob = _agreement(res["dattri_fn"]["scores"], base_s)
        diff = float((res["dattri_fn"]["scores"] - base_s).abs().max() / base_s.abs().max())
        print(f"dattri_fn against its baseline: Pearson {pb:.7f}, top-10 overlap {ob:.3f}, "
              f"max |diff| / max |S| {diff:.1e}")
    for side in [r for r in res if r.startswith("dattri_fn ") and r != "dattri_fn baseline"]:
        c = res[side]["scores"]
        pr, ov = _agreement(c, a)
        pk, ok = _agreement(c, b)
        sr = float(spearman(c.flatten(), a.flatten()))
        print(f"\n{side} against dattri_fn float32: Pearson {pr:.7f}, Spearman {sr:.5f}, top-{k} "
              f"overlap {ov:.3f}; against kronfluence: Pearson {pk:.7f}, top-{k} overlap {ok:.3f}")
    print(f"\nPearson {pearson:.5f}, Spearman {spear:.5f}, top-{k} overlap {overlap:.3f}; "
          f"first round: time ratio {res['dattri_fn']['seconds'] / res['kronfluence']['seconds']:.2f}x, "
          f"peak ratio {res['dattri_fn']['peak_mib'] / max(res['kronfluence']['peak_mib'], 1e-9):.2f}x")
    return {"pearson": pearson, "spearman": spear, "overlap": overlap, "ratios": ratios,
            "load": load, **res}


if __name__ == "__main__":
    main()
