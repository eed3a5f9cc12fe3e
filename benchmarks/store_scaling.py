"""Store-backed Grad-Dot, TRAK and EK-FAC influence against n_train: time and peak memory; 1 vs 2
processes (gloo).

    OMP_NUM_THREADS=1 python -m benchmarks.store_scaling [--sizes 10000 50000 100000 200000]
        [--n-test 100] [--batch 1000] [--top-k 10] [--procs-n 100000] [--root DIR]
        [--methods grad_dot trak ekfac] [--proj-dim 64]

Model: multinomial logistic regression, 32 inputs -> 10 classes (P = 330, float32), seeded;
data generated batch by batch from ``Generator(seed + batch index)`` (a re-iterable that holds
no rows), so the data themselves take no memory. Per size, each step in a fresh spawned process
(``benchmarks.peak.measure_peak``: peak = ``VmHWM`` increment over the RSS just before it):

* ``build``: :func:`dattri_fn.store.build_store` of the per-example gradients (``[n, 330]`` on
  disk, one shard per batch); ``build (coarse)``: the same with ``shard_rows=--coarse`` (fewer
  shards: fewer fsyncs and manifest commits, a coarser unit of resume);
* ``top-k``: Grad-Dot scored from the store (:func:`~dattri_fn.store.open_store`) against
  ``n_test`` test points, keeping the top ``top_k`` per test point; no training data read;
* ``full``: the same with the whole ``[n, n_test]`` written to a ``.npy`` memmap (``out=``);
  its pages are file-backed, so they count in RSS until the kernel writes them back;
* ``direct``: Grad-Dot top-k from the data, no store (reference, same run).

TRAK (``proj_dim`` features, ``cache_features=False``) and EK-FAC influence (``solver="ekfac"``)
run on the same logistic regression as an ``nn.Linear`` (a FunctionalModel, same weights), per
size and step in a fresh process, with ``prepare`` (streamed over the generated data) done in
the setup and timed as its own row:

* ``prepare``: the method's state (TRAK: the projected kernel; EK-FAC: the factors and their
  eigenvalue corrections), streamed over ``n`` rows;
* ``record``: the first scoring through :func:`~dattri_fn.store.record_store` (the training
  features computed from the data and written to the store while the top-k is kept);
* ``store``: a second scoring with new test points from :func:`~dattri_fn.store.open_store`
  (no training data read);
* ``direct``: the top-k from the data without a store (reference, same run).

Then ``--procs-n`` rows built and scored (top-k) by 1 process and by 2 gloo processes on
loopback (:mod:`dattri_fn.distributed`: each rank builds its store part and scores it, rank 0
merges the top-k); wall time from the first rank's start to the last rank's end, imports
excluded (each rank waits on a barrier before its clock starts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time

import torch

DIM, CLASSES, SEED = 32, 10, 0


class Generated:
    """``n`` rows in batches of ``batch``, batch ``i`` drawn from ``Generator(SEED + 1 + i)``."""

    def __init__(self, n: int, batch: int, seed: int = SEED + 1):
        self.n, self.batch, self.seed = n, batch, seed

    def __iter__(self):
        for i, start in enumerate(range(0, self.n, self.batch)):
            b = min(self.batch, self.n - start)
            g = torch.Generator().manual_seed(self.seed + i)
            yield torch.randn(b, DIM, generator=g), torch.randint(0, CLASSES, (b,), generator=g)


def problem():
    g = torch.Generator().manual_seed(SEED)
    params = {"w": torch.randn(CLASSES, DIM, generator=g) / DIM**0.5, "b": torch.zeros(CLASSES)}

    def loss(p, example):
        x, y = example
        return torch.nn.functional.cross_entropy((p["w"] @ x + p["b"])[None], y[None])

    return params, loss


def _test(n_test: int):
    return next(iter(Generated(n_test, n_test, seed=10**6)))


def _features(params, loss):
    from dattri_fn.transforms.grad import per_sample_grad

    return lambda batch: per_sample_grad(loss, params, batch)


CONFIG = {"method": "grad_dot", "proj_dim": None, "seed": SEED}


def setup_build(path, n, batch, shard_rows=None):
    from dattri_fn.store import build_store

    params, loss = problem()
    f = _features(params, loss)
    f(next(iter(Generated(64, 64))))  # warm-up: library code paged in before the clock
    return lambda: build_store(path, f, Generated(n, batch), params=params, config=CONFIG,
                               shard_rows=shard_rows).n_rows


def setup_score(path, n_test, top_k, out):
    from dattri_fn.attribute import grad_dot
    from dattri_fn.store import open_store

    params, loss = problem()
    m, test = grad_dot(loss), _test(n_test)
    store = open_store(path, params=params, config=CONFIG, out=out)
    m.score(params, (), Generated(64, 64), test, top_k=top_k)  # warm-up

    def step():
        res = m.score(params, (), store, test, top_k=None if out else top_k)
        return float(res.values.sum() if top_k and not out else res[-1].sum())

    return step


def setup_direct(n, batch, n_test, top_k):
    from dattri_fn.attribute import grad_dot

    params, loss = problem()
    m, test = grad_dot(loss), _test(n_test)
    m.score(params, (), Generated(64, 64), test, top_k=top_k)  # warm-up
    return lambda: float(m.score(params, (), Generated(n, batch), test, top_k=top_k).values.sum())


def linear_model():
    """The same logistic regression as :func:`problem`, as a FunctionalModel over nn.Linear."""
    from dattri_fn import functional_model

    params, _ = problem()
    lin = torch.nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        lin.weight.copy_(params["w"])
        lin.bias.copy_(params["b"])
    return functional_model(lin, torch.nn.functional.cross_entropy)


def _method(name: str, proj_dim: int):
    from dattri_fn.attribute import classification_margin, classification_weight, influence, trak

    fm = linear_model()
    if name == "trak":
        m = trak(classification_margin(fm.forward), weight_fn=classification_weight(fm.forward),
                 proj_dim=proj_dim, cache_features=False, damping=1e-3)
        return fm, m, {"method": "trak", "proj_dim": proj_dim, "seed": 0}
    return fm, influence(fm, solver="ekfac", damping=1e-3), {"method": "ekfac"}


def setup_method(step, name, path, n, batch, n_test, top_k, proj_dim):
    """``step``: "prepare", "record", "store" or "direct" of method ``name`` on ``n`` rows."""
    from dattri_fn.store import open_store, record_store

    fm, m, config = _method(name, proj_dim)
    small = Generated(256, 128)
    m.score(fm.params, m.prepare(fm.params, small), small, _test(n_test), top_k=top_k)  # warm-up
    data = Generated(n, batch)
    if step == "prepare":
        return lambda: m.prepare(fm.params, data) and None
    state = m.prepare(fm.params, data)
    test = _test(n_test) if step != "store" else next(iter(Generated(n_test, n_test, seed=10**7)))
    train = {"record": lambda: record_store(path, data, params=fm.params, config=config),
             "store": lambda: open_store(path, params=fm.params, config=config),
             "direct": lambda: data}[step]
    return lambda: float(m.score(fm.params, state, train(), test, top_k=top_k).values.sum())


def method_rows(name, sizes, root, batch, n_test, top_k, proj_dim) -> None:
    what = f"TRAK (proj_dim = {proj_dim}, cache_features=False)" if name == "trak" else \
        "EK-FAC influence"
    print(f"\nstore-backed {what}, n_test = {n_test}, top_k = {top_k}\n")
    print("| n_train | prepare s | prepare peak MiB | record s | record peak MiB | store s | "
          "store peak MiB | direct s | direct peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        path = os.path.join(root, f"{name}-{n}")
        cells, errors = [], []
        for step in ("prepare", "record", "store", "direct"):
            s, peak, err = _timed(setup_method, step, name, path, n, batch, n_test, top_k, proj_dim)
            cells += [f"{s:.2f}", f"{peak:.1f}"]
            errors += [err] if err else []
        print(f"| {n:,} | " + " | ".join(cells) + " |" + " ".join(errors), flush=True)
        shutil.rmtree(path, ignore_errors=True)


def _timed(fn, *args):
    from benchmarks.peak import measure_peak

    res = measure_peak(_Timed(fn), *args, timeout=900)
    if "result" not in res:
        return float("nan"), float("nan"), str(res)
    return res["result"], res["peak_mib"], ""


class _Timed:
    """A picklable setup wrapper whose step returns its own wall time."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        step = self.fn(*args)

        def timed():
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0

        return timed


def _rank(rank, world, port, root, n, batch, n_test, top_k, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from dattri_fn import distributed as D
    from dattri_fn.attribute import grad_dot

    D.init(backend="gloo", timeout_s=600)
    params, loss = problem()
    f, m, test = _features(params, loss), grad_dot(loss), _test(n_test)
    data = [b for b in Generated(n, batch)]
    local = D.shard_data(data)
    f((local[0][0][:8], local[0][1][:8]))  # warm-up
    torch.distributed.barrier()
    t0 = time.time()
    store = D.sharded_store(root, f, local, params=params, config=CONFIG)
    part, offset = D.local_part(store)
    top = D.gather_topk(m.score(params, (), part, test, top_k=top_k), offset, k=top_k)
    torch.distributed.barrier()
    t1 = time.time()
    if rank == 0:
        queue.put((t0, t1, float(top.values.sum())))
    torch.distributed.destroy_process_group()


def procs_wall(world, root, n, batch, n_test, top_k) -> tuple[float, float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, root, n, batch, n_test, top_k, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    t0, t1, check = queue.get(timeout=900)
    for p in procs:
        p.join()
    return t1 - t0, check


def grad_dot_rows(args, root) -> None:
    print(f"store-backed Grad-Dot, P = {CLASSES * DIM + CLASSES}, float32, n_test = {args.n_test}, "
          f"batch = {args.batch}, top_k = {args.top_k}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print(f"| n_train | store MiB | build s | build peak MiB | build s ({args.coarse:,}-row shards) | "
          "top-k s | top-k peak MiB | full s | full peak MiB | direct top-k s | direct peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        path = os.path.join(root, f"store-{n}")
        tb, pb, e1 = _timed(setup_build, path, n, args.batch)
        mib = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20
        coarse = os.path.join(root, f"coarse-{n}")
        tc, _, e0 = _timed(setup_build, coarse, n, args.batch, args.coarse)
        shutil.rmtree(coarse, ignore_errors=True)
        ts, ps, e2 = _timed(setup_score, path, args.n_test, args.top_k, None)
        out = os.path.join(root, f"scores-{n}.npy")
        tf, pf, e3 = _timed(setup_score, path, args.n_test, args.top_k, out)
        td, pd, e4 = _timed(setup_direct, n, args.batch, args.n_test, args.top_k)
        print(f"| {n:,} | {mib:.0f} | {tb:.2f} | {pb:.1f} | {tc:.2f} | {ts:.2f} | {ps:.1f} | "
              f"{tf:.2f} | {pf:.1f} | {td:.2f} | {pd:.1f} |"
              + " ".join(e for e in (e0, e1, e2, e3, e4) if e), flush=True)
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(out):
            os.remove(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 50_000, 100_000, 200_000])
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--procs-n", type=int, default=100_000)
    ap.add_argument("--coarse", type=int, default=10_000, help="shard_rows of the coarse build")
    ap.add_argument("--root", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--methods", nargs="*", default=["grad_dot", "trak", "ekfac"],
                    choices=["grad_dot", "trak", "ekfac"])
    ap.add_argument("--proj-dim", type=int, default=64, help="TRAK's projection size")
    args = ap.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="store_scaling_")
    try:
        if "grad_dot" in args.methods:
            grad_dot_rows(args, root)
        for name in ("trak", "ekfac"):
            if name in args.methods:
                method_rows(name, args.sizes, root, args.batch, args.n_test, args.top_k,
                            args.proj_dim)
        if args.procs_n:
            print("\n| processes (gloo) | n_train | build + top-k wall s | speed-up | sum of top-k |")
            print("|---|---|---|---|---|")
            base = None
            for world in (1, 2):
                wall, check = procs_wall(world, os.path.join(root, f"procs-{world}"), args.procs_n,
                                         args.batch, args.n_test, args.top_k)
                base = base or wall
                print(f"| {world} | {args.procs_n:,} | {wall:.2f} | {base / wall:.2f}x | {check:.6g} |",
                      flush=True)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
