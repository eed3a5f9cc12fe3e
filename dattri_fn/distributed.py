"""Attribution over several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank owns a contiguous shard of the training set (:func:`shard_data`). What is replicated
and what is sharded:

* params, test data and test features: replicated (every rank holds them);
* train features / stores: sharded, rank ``r`` writes part ``r`` of a store
  (:func:`sharded_store`); the parts read back in rank order as one store;
* curvature: each rank's statistic is over its own shard, then all-reduced, so every rank holds
  the global one. A curvature product inside CG, ``V -> (1/N) sum_i H_i V``, is the weighted sum
  of the ranks' local means (:func:`all_reduce_linop`); K-FAC factors the same way
  (:func:`all_reduce_kfac`); EK-FAC all-reduces the K-FAC statistics, takes their eigenbases on
  every rank (identical inputs, identical bases) and all-reduces the corrected eigenvalues
  (:func:`ekfac_factors_sharded`, through the factor passes' ``reduce=`` hook,
  :func:`all_reduce_stats`). Every rank then runs the same solver iterations on the same
  numbers;
* scores: each rank scores its shard (its block of rows ``[offset_r, offset_r + n_r)``); a
  top-k is merged on rank 0 (:func:`gather_topk`).

Memory per rank: one shard's batch of features plus the test features and the replicated
curvature state; the rows of a store are on disk, read ``block_rows`` at a time.

Failure: every collective goes through one wrapper that turns torch.distributed's error (a
peer's closed connection, or the process group's ``timeout``) into a RuntimeError naming the
call, this rank and the world size; no rank waits forever on a dead peer (gloo notices a closed
connection at once, a silent peer after the group's timeout). A rerun resumes each rank's store
part from its last complete shard.

Launch: ``torchrun --nproc_per_node=N script.py`` and, in the script, :func:`init` (NCCL when
CUDA is available, gloo otherwise; each rank takes GPU ``LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import _msg, batch_leaves, batch_slice, check_int, is_batch
from ._types import LinOp, as_linop
from .attribute.pipeline import TopK, merge_topk
from .store import FeatureStore, build_store, open_store, params_hash, write_parts_manifest

__all__ = ["init", "rank_and_world", "shard_range", "shard_data", "all_reduce_linop",
           "all_reduce_kfac", "all_reduce_stats", "ekfac_factors_sharded", "sharded_store", "local_part",
           "gather_topk", "row_offset"]


def init(*, backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; return ``(rank, world)``.

    ``backend`` defaults to NCCL when CUDA is available (each rank then uses GPU
    ``LOCAL_RANK``) and gloo otherwise. ``timeout_s`` bounds how long a collective waits for a
    silent peer before it fails.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _collective(func: str, call: Callable, *args, group=None, **kwargs):
    """Run a torch.distributed collective; a dead or silent peer becomes a clear RuntimeError."""
    try:
        return call(*args, group=group, **kwargs)
    except RuntimeError as err:  # DistBackendError, gloo's closed connection, timeouts
        rank, world = rank_and_world(group)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"{func}: rank {rank} of {world}: a collective failed: a peer rank "
                           f"died or did not answer within the process group's timeout "
                           f"(torch.distributed: {first}). Rerun all ranks; stores resume from "
                           f"their last complete shard.") from err


def shard_range(n: int, *, rank: int | None = None, world_size: int | None = None,
                group=None) -> range:
    """Return rank ``rank``'s contiguous share of ``range(n)``: the first ``n % world`` ranks
    get one more item than the rest."""
    check_int("shard_range", "n", n, minimum=0)
    r, w = rank_and_world(group)
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    check_int("shard_range", "world_size", world_size)
    check_int("shard_range", "rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(_msg("shard_range", "rank", f"a rank < world_size = {world_size}",
                              str(rank)))
    q, extra = divmod(n, world_size)
    start = rank * q + min(rank, extra)
    return range(start, start + q + (rank < extra))


def shard_data(data, *, rank: int | None = None, world_size: int | None = None, group=None):
    """Return this rank's contiguous shard: rows of one Batch, or batches of a list of them.

    Concatenated in rank order, the shards are ``data`` again, so a sharded store or a sharded
    score matrix lines up with the single-process one row for row.
    """
    if is_batch(data):
        n = batch_leaves(data)[0].shape[0]
        rows = shard_range(n, rank=rank, world_size=world_size, group=group)
        return batch_slice(data, rows.start, rows.stop)
    if isinstance(data, (list, tuple)):
        idx = shard_range(len(data), rank=rank, world_size=world_size, group=group)
        return list(data[idx.start:idx.stop])
    raise TypeError(_msg("shard_data", "data", "one Batch or a list of Batches (a DataLoader "
                         "shards with a DistributedSampler instead)", type(data).__name__))


def row_offset(n_local: int, *, group=None) -> tuple[int, int]:
    """Return ``(offset, total)``: this rank's first global row and all ranks' rows."""
    rank, world = rank_and_world(group)
    counts = [None] * world
    _collective("row_offset", dist.all_gather_object, counts, int(n_local), group=group)
    return sum(counts[:rank]), sum(counts)


def all_reduce_linop(op, n_local: int, *, group=None) -> LinOp:
    """Return ``V -> sum_r (n_r / N) op_r(V)``, the global-mean curvature product.  # [k, P] -> [k, P]

    ``op`` is this rank's operator over its own shard, a mean over its ``n_local`` examples
    (``hvp``, ``gnvp``, ``fvp``, ``gauss_newton``...); the weighted sum over ranks is the mean
    over all ``N`` examples. Every rank must call the result with the same ``V`` in the same
    order (as a solver running the same iterations on every rank does).

    Note:
        The reduction regroups the sum (per rank, then over ranks), so the product differs from
        the single-process one by rounding only (~1e-16 relative in float64).
    """
    op = as_linop(op, name="all_reduce_linop")
    check_int("all_reduce_linop", "n_local", n_local)
    _, total = row_offset(n_local, group=group)
    weight = n_local / total

    def matmat(V: Tensor) -> Tensor:
        out = op.matmat(V) * weight
        _collective("all_reduce_linop", dist.all_reduce, out, op=dist.ReduceOp.SUM, group=group)
        return out

    return LinOp(matmat, op.dim, op.dtype, op.device, name=f"all_reduce({op.name})")


def _weighted_sum(func: str, tensors: dict[str, Tensor], weight: float, group) -> dict[str, Tensor]:
    out = {}
    for k, v in tensors.items():
        v = v * weight
        _collective(func, dist.all_reduce, v, op=dist.ReduceOp.SUM, group=group)
        out[k] = v
    return out


def all_reduce_kfac(factors, *, group=None):
    """Return K-FAC factors over every rank's examples: ``A = sum_r (n_r / N) A_r`` (same for G
    and the diagonal block of the params outside the Kronecker layers).

    ``factors`` is this rank's :class:`~dattri_fn.operators.kfac.KFACFactors` over its shard.
    Every rank's factors must hold the same layers and diagonal keys (checked: a rank whose
    data made a layer leave the Kronecker layers, by K-FAC's per-example check or the capture
    engine's refusal, is refused by name on every rank, never a mismatched all-reduce);
    :func:`~dattri_fn.operators.kfac.kfac_factors` with ``reduce=all_reduce_stats()`` takes
    those decisions on every rank's data together.
    """
    from .operators.kfac import KFACFactors

    func = "all_reduce_kfac"
    if not isinstance(factors, KFACFactors):
        raise TypeError(_msg(func, "factors", "KFACFactors", type(factors).__name__))
    n = int(factors.num_examples)
    # one gather of every rank's count and layout (keys, shapes, order) before any per-key
    # all-reduce: ranks whose layouts differ would pair the wrong tensors or wait forever
    layout = tuple((field, k, tuple(v.shape)) for field in ("A", "G", "diagonal")
                   for k, v in getattr(factors, field).items())
    got = [None] * rank_and_world(group)[1]
    _collective(func, dist.all_gather_object, got, (n, layout), group=group)
    odd = [r for r, (_, other) in enumerate(got) if other != got[0][1]]
    if odd:
        diff = sorted(set(got[odd[0]][1]) ^ set(got[0][1]))[:6]
        raise ValueError(_msg(func, "factors", "factors of the same layers and diagonal keys on "
                              "every rank", f"ranks {odd} differ from rank 0 (e.g. {diff}): a "
                              "layer left the Kronecker layers on some ranks' data only",
                              "Build them with kfac_factors(..., reduce=all_reduce_stats()), "
                              "which decides on every rank's data together."))
    total = sum(c for c, _ in got)
    w = n / total
    return factors._replace(A=_weighted_sum(func, factors.A, w, group),
                            G=_weighted_sum(func, factors.G, w, group),
                            diagonal=_weighted_sum(func, factors.diagonal, w, group),
                            num_examples=torch.tensor(total, dtype=torch.int64))


def all_reduce_stats(*, group=None) -> Callable:
    """Return ``reduce(sums, count) -> (sums, count)`` summing both over every rank.

    The statistics-reduction hook of :func:`~dattri_fn.operators.kfac.kfac_factors` and
    :func:`~dattri_fn.operators.kfac.ekfac_factors` (``reduce=``): each rank passes the sums of
    its statistics over its shard and its example count; all ranks get the global ones (one
    all-reduce of the flattened sums, one of the count), so they divide by the same ``N`` and
    take identical eigenbases. Every rank must call it in the same order (as the factor passes
    do).
    """
    def reduce(sums: dict[str, Tensor], count: int) -> tuple[dict[str, Tensor], int]:
        keys = list(sums)
        flat = torch.cat([sums[k].reshape(-1) for k in keys]) if keys else None
        n = torch.tensor([count], dtype=torch.int64, device=flat.device if flat is not None
                         else "cpu")
        if flat is not None:
            _collective("all_reduce_stats", dist.all_reduce, flat, op=dist.ReduceOp.SUM,
                        group=group)
        _collective("all_reduce_stats", dist.all_reduce, n, op=dist.ReduceOp.SUM, group=group)
        out, start = {}, 0
        for k in keys:
            size = sums[k].numel()
            out[k] = flat[start:start + size].reshape(sums[k].shape)
            start += size
        return out, int(n)

    return reduce


def ekfac_factors_sharded(module, loss_fn, params, data, *, layers=None, chunk_size=None,
                          batch_rows=None, fisher: str = "empirical", seed: int = 0,
                          sampler=None, dtype=None, others=None, group=None):
    """Return EK-FAC factors over every rank's shard ``data``, equal on every rank.

    :func:`~dattri_fn.operators.kfac.ekfac_factors` with the :func:`all_reduce_stats` hook: the
    K-FAC sums are all-reduced before the eigenbases are taken (identical inputs, identical
    bases on every rank), then ``Lambda = (1/N) sum_r sum_{n in shard r} (Q_G^T DW_n Q_A)^2``.
    ``fisher="true"`` draws each rank's targets from a generator seeded ``seed + rank`` (the
    ranks' draws independent; the same shards and seed give the same factors on a rerun, not
    the draws of a single-process run). ``others``: the params outside the Kronecker layers, as
    in :func:`~dattri_fn.operators.kfac.kfac_factors` (their diagonal ``D`` all-reduced like
    the other statistics).
    """
    from .operators.kfac import ekfac_factors

    rank, _ = rank_and_world(group)
    check_int("ekfac_factors_sharded", "seed", seed, minimum=0)
    return ekfac_factors(module, loss_fn, params, data, layers=layers, chunk_size=chunk_size,
                         batch_rows=batch_rows, fisher=fisher, seed=seed + rank,
                         sampler=sampler, dtype=dtype, others=others,
                         reduce=all_reduce_stats(group=group))


def _part(rank: int) -> str:
    return f"rank-{rank:05d}"


def sharded_store(path: str | os.PathLike, feature_fn: Callable, data, *, params, config=None,
                  shard_rows: int | None = None, device=None, group=None) -> FeatureStore:
    """Return the store of every rank's features: rank ``r`` writes part ``r`` from its shard
    ``data`` (resuming it), rank 0 writes the manifest listing the parts; collective.

    Read back (:func:`~dattri_fn.store.open_store`), the parts concatenate in rank order.
    """
    rank, world = rank_and_world(group)
    path = Path(path)
    build_store(path / _part(rank), feature_fn, data, params=params, config=config,
                shard_rows=shard_rows, device=device, func="sharded_store")
    _collective("sharded_store", dist.barrier, group=group)
    if rank == 0:
        write_parts_manifest(path, [_part(r) for r in range(world)], params_hash_=params_hash(params),
                             config=config)
    _collective("sharded_store", dist.barrier, group=group)
    return open_store(path, params=params, config=config)


def local_part(store: FeatureStore, *, group=None) -> tuple[FeatureStore, int]:
    """Return ``(this rank's part of a sharded store, its first global row)``."""
    rank, world = rank_and_world(group)
    parts = store.manifest.get("parts")
    if parts is None or len(parts) != world:
        raise ValueError(_msg("local_part", "store", f"a store of {world} parts (one per rank)",
                              "an unsharded store" if parts is None else f"{len(parts)} parts"))
    mine = open_store(Path(store.path) / parts[rank], block_rows=store.block_rows)
    offset, _ = row_offset(mine.n_rows, group=group)
    return mine, offset


def gather_topk(best: TopK, offset: int, *, k: int, largest: bool = True, dst: int = 0,
                group=None) -> TopK | None:
    """Merge every rank's top-k (indices local to its shard, shifted by its ``offset``) on rank
    ``dst``; return it there and None elsewhere.  # [k, n_test]"""
    check_int("gather_topk", "k", k)
    rank, world = rank_and_world(group)
    mine = (best.values.cpu(), (best.indices + offset).cpu())
    got = [None] * world if rank == dst else None
    _collective("gather_topk", dist.gather_object, mine, got, dst=dst, group=group)
    if rank != dst:
        return None
    values = torch.cat([v for v, _ in got])
    indices = torch.cat([i for _, i in got])
    # merge_topk ranks the concatenation (NaN last, as everywhere); its indices are positions in it.
    pos = merge_topk(None, values, 0, k, largest)
    return TopK(pos.values, torch.gather(indices, 0, pos.indices))
