"""FactGraSS's outputs in several checkouts, compared bit for bit (``torch.equal``) over many configurations.

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_bits --tree base=/tmp/base --tree now=.

Each tree's ``dattri_fn`` is imported as its own package (:func:`benchmarks.capture_method_ab._load`).
Configurations: a tanh MLP with biases (float64, float32), a ReLU MLP without biases, a bare
Linear, a sequence model (tests/test_factgrass.py's ``SeqNet``: positions and a LayerNorm rest);
one batch, two batches (merged passes), ``batch_rows=1``, ``chunk_size=3``; the cache as features,
as factors (``_keep_bytes`` patched to -1) and none; ``_SKETCH_BYTES`` as shipped and 1 (a block
a row); sjlt / gaussian, fisher / identity, two mask widths. Compared: every tensor of the state,
``score`` (full and top-k), ``self_score``, ``feature_rows``. Printed: the count of configurations
and of tensors compared, and every one that differs from the first tree's.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import warnings

import torch
from torch import nn


def _models(dtype):
    """``{name: (module factory, x, y)}`` of the configurations' models and data (seeded)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_factgrass import SeqNet

    g = torch.Generator().manual_seed(7)
    x = torch.randn(26, 12, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (26,), generator=g)
    xs = torch.randn(26, 3, 10, generator=g, dtype=dtype)

    def make(builder):
        def build():
            torch.manual_seed(3)
            return builder().to(dtype).eval()
        return build

    out = {
        "tanh": (make(lambda: nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4))), x, y),
        "relu-nobias": (make(lambda: nn.Sequential(nn.Linear(12, 20, bias=False), nn.ReLU(),
                                                   nn.Linear(20, 9, bias=False), nn.ReLU(),
                                                   nn.Linear(9, 4))), x, y),
        "linear": (make(lambda: nn.Linear(12, 4)), x, y),
    }
    if dtype == torch.float64:
        out["seq"] = (make(lambda: SeqNet(10, 20, 4, True)), xs, y)
    return out


def _outputs(pkg, build, x, y, cfg: dict) -> list:
    """Every tensor of one configuration's state, scores, self-scores and feature rows."""
    fg = importlib.import_module(f"{pkg.__name__}.attribute.factgrass")
    model = importlib.import_module(f"{pkg.__name__}.model")
    saved = fg._keep_bytes, fg._SKETCH_BYTES
    try:
        if cfg["cache"] == "factors":
            fg._keep_bytes = lambda: -1
        if cfg["sketch_bytes"] is not None:
            fg._SKETCH_BYTES = cfg["sketch_bytes"]
        fm = model.functional_model(build(), torch.nn.functional.cross_entropy)
        m = fg.factgrass(fm, proj_dim=cfg["proj_dim"], mask_dim=cfg["mask_dim"], kind=cfg["kind"],
                         curvature=cfg["curvature"], seed=2, chunk_size=cfg["chunk_size"],
                         batch_rows=cfg["batch_rows"], cache_features=cfg["cache"] != "none")
        train = ((x, y) if cfg["data"] == "one" else
                 [(x[:13], y[:13]), (x[13:], y[13:])])
        test = (x[:5], y[:5])
        st = m.prepare(fm.params, train)
        got = [t for t in torch.utils._pytree.tree_leaves(tuple(st)) if isinstance(t, torch.Tensor)]
        got.append(m.score(fm.params, st, train, test))
        top = m.score(fm.params, st, train, test, top_k=3)
        got += [top.values, top.indices]
        got.append(m.self_score(fm.params, st, train))
        rows = m.prepare.feature_rows(fm.params, st, 2, 9)
        if rows is not None:
            got.append(rows)
        return got
    finally:
        fg._keep_bytes, fg._SKETCH_BYTES = saved


def main(argv=None) -> None:
    from benchmarks.capture_method_ab import _load

    p = argparse.ArgumentParser(prog="python -m benchmarks.factgrass_bits",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=TREE (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pkgs = {}
    for spec in args.tree:
        name, tree = spec.split("=", 1)
        pkgs[name] = _load(name, tree)
    first = next(iter(pkgs))
    grid = dict(data=("one", "two"), cache=("features", "factors", "none"),
                sketch_bytes=(None, 1), kind=("sjlt", "gaussian"), curvature=("fisher", "identity"))
    n_cfg = n_t = 0
    bad = []
    for dtype in (torch.float64, torch.float32):
        for mname, (build, x, y) in _models(dtype).items():
            for vals in itertools.product(*grid.values()):
                cfg = dict(zip(grid, vals, strict=True))
                # the other settings rotate with the grid (not every combination)
                cfg.update(proj_dim=(8, 16)[n_cfg % 2], mask_dim=(3, None)[n_cfg // 2 % 2],
                           chunk_size=(None, 3)[n_cfg // 3 % 2],
                           batch_rows=(None, 1)[n_cfg // 5 % 2] if cfg["data"] == "two" else None)
                outs = {n: _outputs(pkg, build, x, y, cfg) for n, pkg in pkgs.items()}
                n_cfg += 1
                ref = outs[first]
                for n, got in outs.items():
                    if len(got) != len(ref) or not all(
                            torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, ref, strict=False)):
                        bad.append((n, str(dtype), mname, cfg))
                n_t += len(ref)
    print(f"factgrass bits: {n_cfg} configurations, {n_t} tensors each tree, trees {list(pkgs)}")
    for b in bad:
        print("  differs:", *b)
    print("all torch.equal" if not bad else f"{len(bad)} configurations differ")


if __name__ == "__main__":
    main()
