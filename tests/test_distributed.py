"""torch.distributed with 2 gloo processes on loopback: sharded == single-process results, and a
dead rank makes the other fail with a clear error, not a hang."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dattri_fn import io
from dattri_fn.attribute import grad_dot
from dattri_fn.distributed import shard_data, shard_range
from dattri_fn.operators.curvature import hvp
from dattri_fn.solve import ekfac_factors, ihvp_cg, kfac_factors
from dattri_fn.store import open_store

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _launch(scenario: str, out: Path, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Start 2 ranks as torchrun would (RANK/WORLD_SIZE/MASTER_*), wait with a timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "_dist_worker.py"), scenario,
                                       str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_shard_range_partitions_contiguously():
    """shard_range over w ranks tiles range(n) in order, sizes differing by at most one."""
    for n in range(0, 12):
        for w in range(1, 5):
            parts = [shard_range(n, rank=r, world_size=w) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    batch = (torch.arange(5.0), torch.arange(5))
    assert torch.equal(shard_data(batch, rank=1, world_size=2)[0], torch.tensor([3.0, 4.0]))
    assert shard_data([1, 2, 3], rank=0, world_size=2) == [1, 2]
    with pytest.raises(ValueError, match=r"shard_range\(rank=...\): expected a rank < world_size = 2"):
        shard_range(4, rank=2, world_size=2)
    with pytest.raises(TypeError, match=r"shard_data\(data=...\): expected one Batch or a list"):
        shard_data(iter([]), rank=0, world_size=2)


@pytest.mark.slow
@pytest.mark.filterwarnings("error")
def test_dead_rank_fails_clearly_then_rerun_resumes_and_equals_one_process(tmp_path):
    """Rank 1 dies mid-build: rank 0 fails within seconds naming the call, its rank and the world.
    The rerun (2 ranks) resumes rank 1's store part; CG on the all-reduced H V, K-FAC/EK-FAC
    factors equal one process to 1e-12 (sums regrouped over ranks), Grad-Dot scores from the
    sharded store (blocks, rank-0 top-k, the whole store) bit for bit; both ranks hold
    bit-identical CG solutions and EK-FAC eigenvalues."""
    died = _launch("die", tmp_path, timeout=90)
    assert died[1].returncode == 3
    assert died[0].returncode == 0, died[0].stderr[-3000:]
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(seconds) < 25
    assert message.startswith("sharded_store: rank 0 of 2: a collective failed: a peer rank died")
    parts = [json.loads((tmp_path / "store" / p / "manifest.json").read_text())
             for p in ("rank-00000", "rank-00001")]
    assert [len(p["shards"]) for p in parts] == [3, 1] and [p["complete"] for p in parts] == [True, False]
    kept = os.stat(tmp_path / "store" / "rank-00001" / "shard-000000.npy")
    runs = _launch("all", tmp_path)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    again = os.stat(tmp_path / "store" / "rank-00001" / "shard-000000.npy")
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # resumed, not rewritten
    r0, r1 = (io.load(tmp_path / f"rank{r}.pt") for r in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' BLAS schedule, so the scores can match bit for bit
    try:
        _compare(r0, r1, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare(r0, r1, tmp_path):
    model, params, loss, train, test, V = W.problem()
    tol = dict(rtol=0, atol=1e-12)
    assert torch.equal(r0["X"], r1["X"])
    torch.testing.assert_close(r0["X"], ihvp_cg(hvp(loss, params, train), damping=1.0, rtol=1e-12)(V), **tol)
    kf = kfac_factors(model, W.ce, params, train)
    ek = ekfac_factors(model, W.ce, params, train)
    assert int(r0["kfac"].num_examples) == 30 and int(r0["ekfac"].num_examples) == 30
    for name in kf.A:
        torch.testing.assert_close(r0["kfac"].A[name], kf.A[name], **tol)
        torch.testing.assert_close(r0["kfac"].G[name], kf.G[name], **tol)
        assert torch.equal(r0["ekfac"].Lambda[name], r1["ekfac"].Lambda[name])
        # eigenbases are unique only up to sign and order: compare the sorted eigenvalues
        torch.testing.assert_close(torch.sort(r0["ekfac"].Lambda[name].flatten()).values,
                                   torch.sort(ek.Lambda[name].flatten()).values, rtol=0, atol=1e-10)
    _compare_true_fisher(r0, r1, model, params, train)
    m = grad_dot(loss)
    S = m.score(params, (), train, test)
    assert (r0["offset"], r1["offset"]) == (0, 18)
    # same batches, same per-batch products: the score rows are bit-identical
    assert torch.equal(torch.cat([r0["block"], r1["block"]]), S)
    top = m.score(params, (), train, test, top_k=4)
    assert r1["top"] is None and torch.equal(r0["top"].indices, top.indices)
    assert torch.equal(r0["top"].values, top.values)
    store = open_store(tmp_path / "store", params=params, config=W.CONFIG)  # both parts, rank order
    assert store.n_rows == 30
    assert torch.equal(m.score(params, (), store, test), S)


def _compare_true_fisher(r0, r1, model, params, train):
    """Sharded true-Fisher EK-FAC (rank r draws with seed 5 + r) equals one process emulating the
    two ranks through the reduce hook: shard sums added in rank order at both passes (1e-12)."""
    shards, seeds = [train[:3], train[3:]], [5, 6]
    kfac_sums = []
    for shard, seed in zip(shards, seeds, strict=True):
        got = []
        kfac_factors(model, W.ce, params, shard, fisher="true", seed=seed,
                     reduce=lambda s, n, got=got: (got.append((s, n)), (s, n))[1])
        kfac_sums.append(got[0])
    lam1 = []

    def rank1(s, n):  # rank 1: K-FAC sums of rank 0 + its own; records its Lambda sums
        if not lam1 and set(s) == set(kfac_sums[0][0]):
            lam1.append(None)
            return {k: kfac_sums[0][0][k] + v for k, v in s.items()}, n + kfac_sums[0][1]
        lam1[0] = (s, n)
        return s, n

    ekfac_factors(model, W.ce, params, shards[1], fisher="true", seed=6, reduce=rank1)
    calls = iter([kfac_sums[1], lam1[0]])

    def rank0(s, n):
        other, m = next(calls)
        return {k: v + other[k] for k, v in s.items()}, n + m

    ref = ekfac_factors(model, W.ce, params, shards[0], fisher="true", seed=5, reduce=rank0)
    assert int(r0["ekfac_true"].num_examples) == 30
    for name in ref.Lambda:
        assert torch.equal(r0["ekfac_true"].Lambda[name], r1["ekfac_true"].Lambda[name])
        torch.testing.assert_close(r0["ekfac_true"].Lambda[name], ref.Lambda[name], rtol=0,
                                   atol=1e-12)
        # the empirical-Fisher factors differ: the draws are not the data's labels
        assert not torch.allclose(r0["ekfac_true"].Lambda[name], r0["ekfac"].Lambda[name])
