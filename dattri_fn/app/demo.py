"""The main job: train on sklearn digits, attribute test predictions, score methods by LDS, draw.

Everything is bundled (sklearn's digits ship with it); nothing is downloaded. Steps: train ``C``
models, run each method (``dattri_fn.app.recipes``), retrain ``m`` models on random half-subsets for
the linear datamodeling score (cached on disk, resumable), print a table, and save a PNG with the
strongest proponents and opponents of a few test digits.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .. import io
from ..eval.metrics import lds
from ..eval.retrain import lds_ground_truth
from ..eval.tasks import SGD_HPARAMS, get_task, train_model
from .recipes import DEMO_METHODS, recipe

DIGITS_TASKS = ("digits-lr", "digits-mlp", "digits-cnn")


class MethodResult(NamedTuple):
    name: str
    scores: Tensor | None
    seconds: float
    lds_mean: float
    lds_lo: float
    lds_hi: float
    error: str | None


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_demo(*, task_name: str = "digits-mlp", methods: Sequence[str] = DEMO_METHODS,
             n_train: int = 500, n_test: int = 40, subsets: int = 48, models: int = 3,
             device: str = "cpu", out: str | Path = "out/demo", seed: int = 0, show: int = 4,
             quiet: bool = False, sgd: bool = False) -> list[MethodResult]:
    """Run the demo; return one :class:`MethodResult` per method and write ``out/attributions.png``.

    Args:
        task_name: one of :data:`DIGITS_TASKS`.
        methods: names from :data:`dattri_fn.app.recipes.METHODS`.
        n_train, n_test: examples drawn from the 1797 digits.
        subsets: retrained models for the LDS ground truth (alpha = 0.5).
        models: independently trained models (TRAK's ensemble, TracIn's checkpoints).
        device: where attribution runs (training of the ground truth stays on the CPU).
        out: output folder: ``attributions.png``, ``scores.pt``, ``results.md`` and the cache.
        show: test digits drawn in the picture.
        sgd: train (and retrain) with mini-batch SGD on the functional trainer
            (:data:`dattri_fn.eval.tasks.SGD_HPARAMS`), the run MAGIC (``magic``) differentiates.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(task_name, n_train=n_train, n_test=n_test, seed=seed,
                    hparams=dict(SGD_HPARAMS) if sgd else None)
    _log(f"[1/4] training {models} x {task_name} on {n_train} digits", quiet)
    nets = [train_model(task, seed=seed + s) for s in range(models)]
    dev_task = task.to(device)
    nets_dev = [net.to(device) for net in nets]
    _log(f"[2/4] attributing {n_test} test digits with {', '.join(methods)}", quiet)
    raw = {}
    for name in methods:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                r = recipe(name, dev_task, nets_dev)
                state = r.method.prepare(r.params, r.train)
                scores = r.method.score(r.params, state, r.train, r.test).detach().cpu()
            raw[name] = (scores, time.perf_counter() - t0, None)
        except Exception as e:  # a failing method is reported in the table, not hidden
            raw[name] = (None, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
        _log(f"      {name}: {raw[name][1]:.2f}s" + (f" FAILED {raw[name][2]}" if raw[name][2]
                                                    else ""), quiet)
    _log(f"[3/4] ground truth: {subsets} models retrained on random halves (cached in {out})",
         quiet)
    gt = lds_ground_truth(task, subsets, cache_dir=out / "cache", seed=seed, progress=not quiet)
    results = []
    for name, (scores, secs, err) in raw.items():
        if scores is None:
            results.append(MethodResult(name, None, secs, math.nan, math.nan, math.nan, err))
            continue
        res = lds(scores.to(torch.float64), gt.subsets, gt.targets.to(torch.float64))
        lo, hi = (float(v) for v in res.ci95)
        results.append(MethodResult(name, scores, secs, float(res.mean), lo, hi, None))
    table = format_table(task_name, n_train, n_test, subsets, results)
    print(table)
    io.save({r.name: r.scores for r in results if r.scores is not None}, out / "scores.pt")
    _atomic_text(out / "results.md", table + "\n")
    best = max((r for r in results if r.scores is not None), key=lambda r: r.lds_mean,
               default=None)
    if best is not None:
        _log(f"[4/4] drawing proponents/opponents of {best.name} (best LDS)", quiet)
        png = draw_attributions(task, best.scores, best.name, out / "attributions.png", show=show)
        print(f"\nwrote {png}")
    return results


def format_table(task_name: str, n_train: int, n_test: int, subsets: int,
                 results: Sequence[MethodResult]) -> str:
    """Markdown table: method, LDS mean [95% CI], seconds (prepare + score)."""
    lines = [f"{task_name}: n_train={n_train}, n_test={n_test}, LDS over {subsets} retrained "
             f"half-subsets (Spearman, mean over test points)", "",
             "| method | LDS | 95% CI | seconds |", "|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | failed | {r.error[:80]} | {r.seconds:.2f} |")
        else:
            lines.append(f"| {r.name} | {r.lds_mean:.3f} | [{r.lds_lo:.3f}, {r.lds_hi:.3f}] | "
                         f"{r.seconds:.2f} |")
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def draw_attributions(task, scores: Tensor, method: str, path: str | Path, *, show: int = 4,
                      k: int = 3) -> Path:
    """Save a grid: per test digit, the image, its top-``k`` proponents and opponents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    show = min(show, scores.shape[1])
    mean, std = task.meta.get("pixel_mean", 0.0), task.meta.get("pixel_std", 1.0)
    images = lambda x: (x.reshape(-1, 64).cpu() * std + mean).reshape(-1, 8, 8).numpy()
    xtr, xte = images(task.x_train), images(task.x_test)
    fig, axes = plt.subplots(show, 2 * k + 1, figsize=(1.6 * (2 * k + 1), 1.9 * show),
                             squeeze=False)
    for row in range(show):
        col = scores[:, row]
        pro = torch.topk(col, k).indices
        opp = torch.topk(col, k, largest=False).indices
        cells = [(xte[row], f"test: {int(task.y_test[row])}", "black")]
        cells += [(xtr[i], f"+ {int(task.y_train[i])} ({float(col[i]):.2g})", "tab:green")
                  for i in pro]
        cells += [(xtr[i], f"- {int(task.y_train[i])} ({float(col[i]):.2g})", "tab:red")
                  for i in opp]
        for ax, (img, title, color) in zip(axes[row], cells, strict=True):
            ax.imshow(img, cmap="gray_r")
            ax.set_title(title, fontsize=8, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{method}: test digit | {k} strongest proponents (+) | {k} strongest "
                 f"opponents (-), label (score)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
