"""Feature stores: per-example features on disk, written shard by shard, resumable after a kill.

A store is a directory::

    manifest.json        request (config, params hash, dtype, row shape) + the committed shards
    shard-000000.npy     rows [0, n_0) of the features, a plain .npy read back memory-mapped
    shard-000001.npy     rows [n_0, n_0 + n_1) ...

Every attributor reduces to ``scores = T P^T`` (:mod:`dattri_fn.attribute.pipeline`); a store
holds ``T``, the train-side features, so a later run with new test points reads no training
data: pass the store where the method takes ``train``.

Crash safety. Each shard is written to a locked temp file, fsynced and renamed
(:func:`dattri_fn.io.atomic_path`); then the manifest, listing it, is replaced the same way (the
last shard's manifest also marks the store complete). The manifest is the commit record: a
shard file it does not list (a kill between the two renames) is recomputed. A resumed
:func:`build_store` first removes every temp file no live writer holds
(:func:`dattri_fn.io.clean_temps`), re-reads the data (hashing it, without computing features)
up to the last committed shard and continues from there, so the finished store is bit-identical
to one written without interruption (features of a shard depend only on its rows).

Refusal. A store records what produced it: the caller's ``config`` (method, projection
dimension, seed...), a SHA-256 of the params (names, dtypes, shapes, bytes), the SHA-256 of
every shard's input rows (the data and its order), the features' dtype and row shape, the
shard size, and the library, torch and numpy versions. Resuming or opening it with a request
that differs in any of these raises a ValueError naming the field, never a silent reuse.

A store written by several ranks (:mod:`dattri_fn.distributed`) is a directory of parts, one
per rank, with a manifest listing them; it reads as their concatenation in rank order.

A grouped store (:func:`write_grouped`, ``"kind": "grouped"``) holds several named members in
ONE shard, each with its own params and data hashes (the per-example gradients of ``k``
training steps, written by ``training.record`` in append mode): one shard and one manifest
commit for the group, and ``open_store(<group>/<member>)`` reads a member's rows alone.

Self-scores. ``s_i = <t(z_i), p(z_i)>`` needs each training example under the test-side map
too, which the train features alone do not give (influence: ``p = (H + damping I)^-1 g``).
A method's ``self_score`` given a :func:`record_store` therefore writes the diagonal itself,
a store of ``[n]`` rows (manifest ``"kind": "self"``) in the ``self/`` sub-directory, with the
same crash safety and the same request; given the opened store (:func:`open_store`), it reads
``self/`` back and reads no training data (:func:`self_scores`). Where ``p`` depends on the
method's state (TRAK's kernel, LoGra's eigenbasis, representer points' ``alpha``), the record
also carries the state's :func:`state_hash` (:func:`record_self`): a record made under another
state is refused naming ``state``, on resume and on reading back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._checks import (
    _msg,
    batch_leaves,
    batch_size,
    batch_to,
    check_int,
    check_optional_int,
    iter_batches,
    regroup,
)
from .io import atomic_path, clean_temps

FORMAT = "dattri_fn.store/1"
MANIFEST = "manifest.json"
SELF = "self"  # the sub-directory holding a store's self-scores
# Rows per block when a store is streamed: ``block_rows x F`` values are in memory at a time.
BLOCK_ROWS = 4096

__all__ = ["FeatureStore", "StoreRecording", "build_store", "open_store", "record_store",
           "stats_store", "self_scores", "record_self", "write_grouped", "grouped_parts",
           "params_hash", "state_hash", "check_store_state", "batch_hash", "FORMAT"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dattri_fn")
    except Exception:  # not installed (a source checkout on sys.path)
        return "unknown"


def _versions() -> dict[str, str]:
    return {"dattri_fn": _version(), "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _update_tensor(h, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{list(t.shape)}".encode())
    # bytes of the storage as it lies: bit-exact, dtype-agnostic (bfloat16 has no numpy view)
    # reshape(-1): a 0-d tensor (a scalar bias) has no byte view of its own; same bytes.
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def params_hash(params, *, func: str = "params_hash") -> str:
    """Return the SHA-256 (hex) of a params dict, or of a list of them, in key order.

    Names, dtypes, shapes and the exact bytes enter; any change of a weight changes it.
    ``func`` names the public call in errors.
    """
    h = hashlib.sha256()
    for p in params if isinstance(params, (list, tuple)) else [params]:
        if not isinstance(p, Mapping) or not all(isinstance(v, Tensor) for v in p.values()):
            raise TypeError(_msg(func, "params", "a dict[str, Tensor] or a list of them",
                                 type(p).__name__))
        for k, v in p.items():
            h.update(str(k).encode() + b"\0")
            _update_tensor(h, torch.as_tensor(v))
    return h.hexdigest()


def state_hash(state, *, func: str = "state_hash") -> str:
    """Return the SHA-256 (hex) of a method state: its structure, every tensor leaf (dtype,
    shape, bytes) and every other leaf's ``repr``, in tree order.

    A self-score ``<t(z_i), p(z_i)>`` depends on the state where ``p`` does (TRAK's kernel,
    LoGra's eigenbasis, representer points' ``alpha``): recorded with this hash, it is never
    read back for another ``prepare``.
    """
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(state)
    h = hashlib.sha256(str(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            _update_tensor(h, leaf)
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            h.update(repr(leaf).encode() + b"\0")
        else:
            raise TypeError(_msg(func, "state", "a state of tensors (NamedTuples, dicts, lists "
                                 "of them)", f"a leaf of type {type(leaf).__name__}"))
    return h.hexdigest()


def batch_hash(batch) -> str:
    """Return the SHA-256 (hex) of a Batch's leaves (dtype, shape, bytes), in order."""
    h = hashlib.sha256()
    for t in batch_leaves(batch):
        _update_tensor(h, t)
    return h.hexdigest()


def _canonical(config, func: str = "build_store") -> dict:
    """``config`` as JSON would give it back (tuples -> lists), refusing what JSON cannot hold."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(_msg(func, "config", "a dict of JSON values (method, proj_dim, "
                             "seed...)", type(config).__name__))
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(_msg(func, "config", "JSON-serialisable values", str(err))) from err


def _directory(func: str, path) -> Path:
    """``path`` as a Path that is a directory or does not exist yet, or raise naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(_msg(func, "path", "a str or os.PathLike", type(path).__name__))
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(_msg(func, "path", "a directory (or a path to create one at)",
                              f"the existing file {str(path)!r}"))
    return path


class StoreRecording(NamedTuple):
    """A request to build a store while scoring: pass it as ``train`` to any attributor.

    The pipeline (:func:`~dattri_fn.attribute.pipeline.stream_scores`, ``collect``) computes
    the train features of ``data`` with the attributor's own feature map, writes them to
    ``path`` shard by shard (resuming a killed run) and scores from the store.
    """

    path: str
    data: Any
    params_hash: str
    config: dict
    shard_rows: int | None
    block_rows: int


def record_store(path: str | os.PathLike, data, *, params, config: Mapping | None = None,
                 shard_rows: int | None = None, block_rows: int = BLOCK_ROWS) -> StoreRecording:
    """Return a :class:`StoreRecording` of ``data``'s train features into ``path``.

    Args:
        path: the store directory (created; an existing store there is resumed or refused).
        data: the training data, one Batch or a re-iterable of Batches, in a fixed order.
        params: the params (or list of checkpoints) the features are taken at; hashed.
        config: what else determines the features: method name, proj_dim, seed... (JSON).
        shard_rows: merge consecutive batches into shards of at least this many rows (None:
            one shard per batch); a shard is the unit of resume.
        block_rows: rows per block when scoring from the store (bounds memory).
    """
    _directory("record_store", path)
    check_optional_int("record_store", "shard_rows", shard_rows)
    check_int("record_store", "block_rows", block_rows)
    iter_batches("record_store", "data", data)
    return StoreRecording(os.fspath(path), data, params_hash(params, func="record_store"),
                          _canonical(config, "record_store"), shard_rows, block_rows)


class FeatureStore(NamedTuple):
    """A complete store opened for reading: ``n_rows`` feature rows in shards.

    Fields:
        path: the store directory.
        manifest: its manifest (the request and the shards).
        shards: ``(file, rows)`` per shard, in row order (over every part of a sharded store),
            or ``(file, rows, start)`` for the rows ``[start, start + rows)`` of a grouped shard
            (one step of a record written by :func:`write_grouped`).
        block_rows: rows per block when streamed (bounds memory: ``block_rows x F`` values).
        out: where the pipeline writes the full ``[n_train, n_test]`` scores (a ``.npy``
            memmap, finalised atomically), or None to return them in memory.
    """

    path: str
    manifest: dict
    shards: tuple[tuple[str, int] | tuple[str, int, int], ...]
    block_rows: int = BLOCK_ROWS
    out: str | None = None

    @property
    def n_rows(self) -> int:
        return sum(s[1] for s in self.shards)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    def blocks(self, device=None) -> Iterator[Tensor]:
        """Yield the features in row order, at most ``block_rows`` rows a block.

        A block is ``[b, *row_shape]``, or ``[C, b, F]`` for a store of stacked (ensemble)
        features, as the feature map gave them; each is a copy, so the memory-mapped shard
        is never written through.
        """
        stacked = self.manifest["layout"] == "stacked"
        for file, rows, *start in self.shards:
            arr = np.load(file, mmap_mode="r")
            # (file, rows, start): a part of a grouped shard (one step of a record) from `start`
            part, start = bool(start), start[0] if start else 0
            if (arr.shape[0] < start + rows) if part else (arr.shape[0] != rows):
                raise ValueError(_msg("FeatureStore", "path", f"{rows + start} rows in {file} as "
                                      "the manifest lists", f"{arr.shape[0]}",
                                      "The store was altered; rebuild it."))
            for s in range(start, start + rows, self.block_rows):
                block = torch.from_numpy(np.array(arr[s:min(s + self.block_rows, start + rows)]))
                if stacked:
                    block = block.transpose(0, 1)  # stored [b, C, F] -> [C, b, F]
                yield block if device is None else block.to(device)

    def read(self) -> Tensor:
        """Return every row at once (``[n, *row_shape]`` or ``[C, n, F]``): small stores only."""
        blocks = list(self.blocks())
        return torch.cat(blocks, dim=1 if self.manifest["layout"] == "stacked" else 0)


def _load_manifest(func: str, path: Path) -> dict | None:
    try:
        with open(path / MANIFEST) as f:
            man = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(_msg(func, "path", f"a readable store manifest at {path / MANIFEST}",
                              str(err))) from err
    if man.get("format") != FORMAT:
        raise ValueError(_msg(func, "path", f"a store of format {FORMAT!r}",
                              f"{man.get('format')!r} at {path}"))
    return man


def _write_manifest(path: Path, man: dict) -> None:
    with atomic_path(path / MANIFEST) as tmp, open(tmp, "w") as f:
        json.dump(man, f, indent=1, sort_keys=True)


def _check_request(func: str, man: dict, request: Mapping, *, arg_of: Mapping[str, str]) -> None:
    """Raise naming the first field of ``request`` that the manifest ``man`` does not match."""
    for field, want in request.items():
        have = man.get(field)
        if field == "config":
            keys = sorted(set(have or {}) | set(want))
            for k in keys:
                if (have or {}).get(k, "<absent>") != want.get(k, "<absent>"):
                    raise ValueError(_msg(func, "config", f"the store's config[{k!r}] = "
                                          f"{(have or {}).get(k, '<absent>')!r}",
                                          f"config[{k!r}] = {want.get(k, '<absent>')!r}",
                                          "Use a new path, or the request the store was built "
                                          "with."))
        elif have != want:
            raise ValueError(_msg(func, arg_of.get(field, field), f"the store's {field} = "
                                  f"{have!r}", f"{want!r}", "The store was built for another "
                                  "request; use a new path."))


def _stack_layout(feats) -> tuple[str, np.ndarray]:
    """Features of one shard as ``(layout, [b, ...] array)``; ``[C, b, F]`` stored as ``[b, C, F]``."""
    if not isinstance(feats, Tensor):
        if not hasattr(feats, "to_dense"):
            raise TypeError(_msg("build_store", "feature_fn", "Tensor features (or structured "
                                 "rows with to_dense())", type(feats).__name__))
        feats = feats.to_dense()
        layout = "stacked"
    else:
        layout = "stacked" if feats.ndim == 3 else "rows"
    feats = feats.detach().cpu()
    if layout == "stacked":
        feats = feats.transpose(0, 1)
    return layout, np.ascontiguousarray(feats.numpy())


def build_store(path: str | os.PathLike, feature_fn: Callable, data, *, params,
                config: Mapping | None = None, shard_rows: int | None = None, device=None,
                block_rows: int = BLOCK_ROWS, func: str = "build_store",
                _params_hash: str | None = None, _kind: str = "features",
                _state_hash: str | None = None, _with_offset: bool = False) -> FeatureStore:
    """Return the complete store of ``feature_fn`` over ``data`` at ``path``, resuming a partial one.

    ``T = cat_s feature_fn(shard_s)``  # [n, F] (or [C, n, F]) on disk, shard by shard

    Args:
        path: the store directory; created if missing.
        feature_fn: ``batch -> [b, F]`` (``[C, b, F]``, or rows with ``to_dense()``).
        data: one Batch or a re-iterable of Batches in a fixed order.
        params: the params the features are taken at (hashed into the manifest).
        config: what else determines the features (method, proj_dim, seed...; JSON values).
        shard_rows: merge consecutive batches into shards of at least this many rows (None:
            one shard per batch).
        device: where each shard's batch is moved before ``feature_fn`` (None: left as is).
        block_rows: rows per block when the returned store is streamed.

    Returns:
        The :class:`FeatureStore`.

    Raises:
        ValueError: the directory holds a store of another request (config key, params hash,
            shard_rows, dtype, row shape, versions) or of other data (a shard's rows hash
            differently, or there are fewer rows), naming the field.
    """
    path = _directory(func, path)
    if not callable(feature_fn):
        raise TypeError(_msg(func, "feature_fn", "a callable batch -> [b, F] features",
                             type(feature_fn).__name__))
    check_optional_int(func, "shard_rows", shard_rows)
    check_int(func, "block_rows", block_rows)
    from .attribute.pipeline import features

    path.mkdir(parents=True, exist_ok=True)
    with _writer_lock(func, path):
        return _build(func, features, path, feature_fn, data, params, config, shard_rows, device,
                      block_rows, _params_hash, _kind, _state_hash, _with_offset)


@contextlib.contextmanager
def _writer_lock(func: str, path: Path):
    """Hold ``path/writer.lock`` (flock) while writing: a second live writer is refused; a
    killed one's lock goes with its process."""
    from .io import fcntl

    if fcntl is None:  # Windows: no flock; one writer per store is the caller's to keep
        yield
        return
    fd = os.open(path / "writer.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(_msg(func, "path", "a store no other live process is writing",
                                  f"{str(path)!r} locked by another writer",
                                  "Wait for it, or write elsewhere.")) from None
        except OSError:
            pass  # no locks on this file system
        yield
    finally:
        os.close(fd)


def _build(func, features, path, feature_fn, data, params, config, shard_rows, device,
           block_rows, _params_hash, kind, _state_hash=None, with_offset=False):
    clean_temps(path)
    request = {"format": FORMAT, "kind": kind,
               "params_hash": _params_hash or params_hash(params, func=func),
               "config": _canonical(config, func), "shard_rows": shard_rows,
               "versions": _versions()}
    if _state_hash is not None:
        request["state_hash"] = _state_hash
    man = _load_manifest(func, path)
    if man is None:
        man = dict(request, shards=[], complete=False)
        _write_manifest(path, man)
    else:
        _check_state(func, man, request, path)
        _check_request(func, man, request, arg_of={"params_hash": "params",
                                                  "shard_rows": "shard_rows", "kind": "path"})
    done = man["shards"]
    s = row = 0  # shard, and its first row (counted over committed shards too)
    for batch, last in _with_last(regroup(iter_batches(func, "data", data), shard_rows, func)):
        rows = batch_size(func, "data", batch)
        digest = batch_hash(batch)
        if s < len(done):
            if done[s]["data_hash"] != digest or done[s]["rows"] != rows:
                raise ValueError(_msg(func, "data", f"the rows of shard {s} as the store holds "
                                      f"them ({done[s]['rows']} rows, hash "
                                      f"{done[s]['data_hash'][:12]})",
                                      f"{rows} rows hashing to {digest[:12]}",
                                      "The data or its order changed; use a new path."))
            s += 1
            row += rows
            continue
        if man["complete"]:
            raise ValueError(_msg(func, "data", f"the store's {len(done)} shards "
                                  f"({sum(d['rows'] for d in done)} rows)", "more rows",
                                  "The data changed; use a new path."))
        if device is not None:
            batch = batch_to(batch, device)
        # with_offset: feature_fn(batch, first row) serves rows kept elsewhere (a method state)
        fn = (lambda b, at=row: feature_fn(b, at)) if with_offset else feature_fn
        layout, arr = _stack_layout(features(func, "data", fn, batch))
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise ValueError(_msg(func, "feature_fn", f"one row per example ({rows})",
                                  f"shape {list(arr.shape)}"))
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            # A NaN row would poison every later score read from the store.
            raise ValueError(_msg(func, "feature_fn", "finite features", f"NaN or inf in shard {s}"))
        meta = {"layout": layout, "dtype": str(arr.dtype), "row_shape": list(arr.shape[1:])}
        if "layout" in man:
            _check_request(func, man, meta, arg_of={k: "feature_fn" for k in meta})
        else:
            man.update(meta)
        name = f"shard-{s:06d}.npy"
        with atomic_path(path / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        done.append({"file": name, "rows": rows, "data_hash": digest})
        if last:  # the last shard's commit completes the store too: one manifest write fewer
            _complete(man)
        _write_manifest(path, man)
        s += 1
        row += rows
    if s == 0:
        raise ValueError(f"{func}(data=...): expected at least one batch, got an empty iterable.")
    if s < len(done):
        raise ValueError(_msg(func, "data", f"the store's {len(done)} shards "
                              f"({sum(d['rows'] for d in done)} rows)", f"{s} shards",
                              "The data changed; use a new path."))
    if not man["complete"]:
        _complete(man)
        _write_manifest(path, man)
    return _opened(path, man, block_rows, None)


def _complete(man: dict) -> None:
    """Mark the manifest complete: its row count and the hash of its shards' data hashes."""
    done = man["shards"]
    h = hashlib.sha256("".join(d["data_hash"] for d in done).encode())
    man.update(complete=True, n_rows=sum(d["rows"] for d in done), data_hash=h.hexdigest())


def _with_last(items) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)``, reading one item ahead."""
    it = iter(items)
    end = object()
    item = next(it, end)
    while item is not end:
        following = next(it, end)
        yield item, following is end
        item = following


def _check_state(func: str, man: dict, request: Mapping, path: Path) -> None:
    """Raise naming ``state`` when the store at ``path`` was written under another state."""
    want = request.get("state_hash")
    if want is not None and man.get("state_hash") != want:
        have = man.get("state_hash")
        raise ValueError(_msg(func, "state", f"the state the store at {str(path)!r} was "
                              f"written under (state_hash {(have or '<none>')[:12]})",
                              f"state_hash {want[:12]}", "Its rows depend on the state (another "
                              "prepare, damping or training set); remove that directory to "
                              "write them for this one."))


def check_store_state(func: str, store: FeatureStore, state) -> None:
    """Raise naming ``func(state=...)`` unless ``store`` was written under ``state`` (its
    manifest's ``state_hash``: rows a method served from its state, not from the data)."""
    _check_state(func, store.manifest, {"state_hash": state_hash(state, func=func)},
                 Path(store.path))


def _opened(path: Path, man: dict, block_rows: int, out) -> FeatureStore:
    if "parts" in man:
        shards, first = [], None
        for part in man["parts"]:
            sub = _load_manifest("open_store", path / part)
            if sub is None or not sub.get("complete"):
                raise ValueError(_msg("open_store", "path", f"a complete part {part!r}",
                                      "a missing or partial one", "Rerun the writing ranks."))
            shards += [(str(path / part / d["file"]), d["rows"]) for d in sub["shards"]]
            first = first or sub
        man = dict(first, **{k: v for k, v in man.items() if k != "shards"})
    else:
        shards = [(str(path / d["file"]), d["rows"]) for d in man["shards"]]
    return FeatureStore(str(path), man, tuple(shards), block_rows,
                        None if out is None else os.fspath(out))


def open_store(path: str | os.PathLike, *, params=None, config: Mapping | None = None,
               block_rows: int = BLOCK_ROWS, out: str | os.PathLike | None = None) -> FeatureStore:
    """Return the complete store at ``path``, refusing one built for another request.

    Args:
        path: a store directory written by :func:`build_store` (or by several ranks).
        params: if given, must hash as the params the store was built at.
        config: if given, must equal the store's config key by key.
        block_rows: rows per block when streamed (bounds memory).
        out: where the pipeline writes the full ``[n_train, n_test]`` scores as a ``.npy``
            memmap (finalised atomically; returned memory-mapped), or None for memory.

    Raises:
        FileNotFoundError: no store at ``path``.
        ValueError: an incomplete store, or one whose params hash or config differs (named).
    """
    path = _directory("open_store", path)
    check_int("open_store", "block_rows", block_rows)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(_msg("open_store", "out", "None or a str or os.PathLike",
                             type(out).__name__))
    man = _load_manifest("open_store", path)
    if man is None and not path.exists():
        view = _grouped_part(path, block_rows, out)
        if view is not None:
            _check_request("open_store", view.manifest, _open_request(params, config),
                           arg_of={"params_hash": "params"})
            return view
    if man is None:
        raise FileNotFoundError(_msg("open_store", "path", "a store directory with a manifest",
                                     repr(str(path))))
    if not man.get("complete") and "parts" not in man:
        raise ValueError(_msg("open_store", "path", "a complete store",
                              f"one with {len(man['shards'])} committed shards",
                              "Resume it with build_store (or score with a record_store)."))
    _check_request("open_store", man, _open_request(params, config),
                   arg_of={"params_hash": "params"})
    return _opened(path, man, block_rows, out)


def _open_request(params, config) -> dict:
    request = {}
    if params is not None:
        request["params_hash"] = params_hash(params, func="open_store")
    if config is not None:
        request["config"] = _canonical(config, "open_store")
    return request


GROUPED = "grouped"  # the kind of a store whose one shard holds several named parts


def write_grouped(path: str | os.PathLike, parts, *, config: Mapping | None = None,
                  func: str = "write_grouped") -> None:
    """Write ``parts`` as ONE shard of a new store at ``path`` that names each part's rows.

    ``parts``: ``[(name, rows [b_i, ...] array, data_hash, params_hash)]``, e.g. the per-example
    gradients of several training steps, each at its own params. The shard and then the
    manifest are written atomically (two fsynced renames for all parts, where a store per part
    takes four each); the manifest is the commit record, so a kill at any point leaves either
    no committed group (written again in full by the next call, whose temp files it removes)
    or a complete one. ``open_store(path / name)`` then reads part ``name`` alone (its
    manifest's ``params_hash`` is the part's, its ``config`` gains ``"part": name``).

    Raises:
        ValueError: parts of different dtypes or row shapes, or none.
    """
    path = _directory(func, path)
    if not parts:
        raise ValueError(_msg(func, "parts", "at least one part", "none"))
    arrays = [np.ascontiguousarray(a) for _, a, _, _ in parts]
    if len({(a.dtype.str, a.shape[1:]) for a in arrays}) != 1:
        raise ValueError(_msg(func, "parts", "rows of one dtype and row shape",
                              str(sorted({(a.dtype.str, a.shape[1:]) for a in arrays}))))
    path.mkdir(parents=True, exist_ok=True)
    with _writer_lock(func, path):
        clean_temps(path)
        arr = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        name = "shard-000000.npy"
        with atomic_path(path / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        table, start = {}, 0
        for (part, _, data_hash, p_hash), a in zip(parts, arrays, strict=True):
            table[str(part)] = {"start": start, "rows": int(a.shape[0]), "data_hash": data_hash,
                                "params_hash": p_hash}
            start += a.shape[0]
        digest = hashlib.sha256("".join(d for _, _, d, _ in parts).encode()).hexdigest()
        _write_manifest(path, {
            "format": FORMAT, "kind": GROUPED, "config": _canonical(config, func),
            "layout": "rows", "dtype": str(arr.dtype), "row_shape": list(arr.shape[1:]),
            "shards": [{"file": name, "rows": int(arr.shape[0]), "data_hash": digest}],
            "members": table, "complete": True, "n_rows": int(arr.shape[0]), "data_hash": digest,
            "versions": _versions()})


def grouped_parts(path: str | os.PathLike) -> dict | None:
    """Return the part table of the complete grouped store at ``path`` (None: none committed)."""
    man = _load_manifest("grouped_parts", Path(path))
    return None if man is None or man.get("kind") != GROUPED else man["members"]


def _grouped_part(path: Path, block_rows: int, out) -> FeatureStore | None:
    """The store of part ``path.name`` of the grouped store at ``path.parent``, or None."""
    man = _load_manifest("open_store", path.parent)
    if man is None or man.get("kind") != GROUPED or path.name not in man["members"]:
        return None
    part = man["members"][path.name]
    file = str(path.parent / man["shards"][0]["file"])
    view = {k: v for k, v in man.items() if k != "members"}
    view.update(kind="features", params_hash=part["params_hash"], data_hash=part["data_hash"],
                n_rows=part["rows"], config=dict(man["config"], part=path.name),
                shards=[{"file": man["shards"][0]["file"], "rows": part["rows"],
                         "data_hash": part["data_hash"]}])
    return FeatureStore(str(path), view, ((file, part["rows"], part["start"]),), block_rows,
                        None if out is None else os.fspath(out))


def self_scores(func: str, store: FeatureStore, *, state=None) -> Tensor:
    """Return the self-scores recorded for ``store`` (a store of ``kind`` "self", or a feature
    store whose ``self/`` sub-directory holds them).  # -> [n_rows]

    ``state``: the method state the caller scores with; when given, the record must have been
    made with it (:func:`record_self`, same :func:`state_hash`).

    Raises:
        ValueError: naming ``func(train=...)``: none recorded, an incomplete record, or one of
            another request (params, config, data or row count) than the store's; naming
            ``func(state=...)``: one recorded with another state.
    """
    want = None if state is None else {"state_hash": state_hash(state, func=func)}
    if store.manifest.get("kind") == SELF:
        if want is not None:
            _check_state(func, store.manifest, want, Path(store.path))
        return store.read()
    path = Path(store.path) / SELF
    man = _load_manifest(func, path)
    fix = ("Pass the record_store(...) of this store to self_score once: it writes the "
           "self-scores to <store>/self.")
    if man is None or not man.get("complete"):
        state = "none" if man is None else f"an incomplete record ({len(man['shards'])} shards)"
        raise ValueError(_msg(func, "train", "a store with its self-scores recorded (they need "
                              "the examples under the test-side map, which train features "
                              "alone do not give)", f"{state} at {str(path)!r}", fix))
    for field in ("params_hash", "config", "n_rows", "data_hash"):
        if man.get(field) != store.manifest.get(field):
            raise ValueError(_msg(func, "train", f"self-scores recorded for this store (the "
                                  f"same {field})", f"{man.get(field)!r} in {str(path)!r} "
                                  f"against {store.manifest.get(field)!r}", fix))
    if want is not None:
        _check_state(func, man, want, path)
    return _opened(path, man, store.block_rows, None).read()


def record_self(func: str, rec: StoreRecording, diag_fn: Callable, *, device=None,
                state=None, with_offset: bool = False) -> Tensor:
    """Return ``s = cat_s diag_fn(shard_s)`` over ``rec``'s data, recorded to ``<rec.path>/self``.  # -> [n]

    The self-scores are a store of ``[n]`` rows (``kind`` "self") under ``rec``'s request
    (params hash, config, shard size, the data's hashes) plus, when ``state`` is given, its
    :func:`state_hash`: written shard by shard with :func:`build_store`'s crash safety, a
    killed record resumes from its last complete shard, and a complete one is read back
    without calling ``diag_fn``. Read them later with :func:`self_scores` on the opened store.

    Args:
        func: the public call errors name.
        rec: the :func:`record_store` request (its ``path`` is the feature store's directory).
        diag_fn: ``batch -> [b]``, the self-scores of a batch's examples.
        device: where each shard's batch is moved before ``diag_fn``.
        state: the method state the self-scores depend on (None: they do not).
        with_offset: call ``diag_fn(batch, first_row)`` (self-scores kept in the state, served
            by row; the offset counts committed shards too, so a resumed record is aligned).

    Raises:
        ValueError: a record at ``<rec.path>/self`` of another request or state, by name.
    """
    store = build_store(os.path.join(rec.path, SELF), diag_fn, rec.data, params=None,
                        config=rec.config, shard_rows=rec.shard_rows, device=device,
                        block_rows=rec.block_rows, func=func, _params_hash=rec.params_hash,
                        _kind=SELF, _with_offset=with_offset,
                        _state_hash=None if state is None else state_hash(state, func=func))
    return store.read()


def write_parts_manifest(path: str | os.PathLike, parts: list[str], *, params_hash_: str,
                         config: Mapping | None) -> None:
    """Write the manifest of a store made of ``parts`` (sub-directories, in row order)."""
    man = {"format": FORMAT, "kind": "features", "parts": list(parts), "complete": True,
           "params_hash": params_hash_, "config": _canonical(config), "shards": []}
    _write_manifest(Path(path), man)


def scores_file(out: str | os.PathLike, n_rows: int, blocks: Iterator[Tensor]) -> Tensor:
    """Write score blocks (``[b, n_test]`` in row order) into ``out`` as an ``[n_rows, n_test]``
    ``.npy`` file, renamed into place only when complete; return it memory-mapped
    (copy-on-write: editing the tensor never changes the file).

    Blocks are appended through a file object, not a writable memmap: written pages then sit
    in the page cache, not in this process's resident set, so peak memory is one block.
    """
    out = Path(out)
    offset, width = 0, None
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for block in blocks:
            arr = np.ascontiguousarray(block.detach().cpu().numpy())
            if width is None:
                width = arr.shape[1]
                np.lib.format.write_array_header_1_0(f, {
                    "descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False,
                    "shape": (n_rows, width)})
            f.write(arr.tobytes())
            offset += arr.shape[0]
        if width is None or offset != n_rows:
            raise ValueError(_msg("scores_file", "blocks", f"{n_rows} rows", f"{offset}"))
    return torch.from_numpy(np.load(out, mmap_mode="c"))


STATS = "stats.pt"


def stats_store(path: str | os.PathLike, compute: Callable[[], Any], *, params,
                config: Mapping | None = None, map_location=None) -> Any:
    """Return curvature statistics cached at ``path``, computing and saving them when absent.

    ``compute()`` (e.g. ``lambda: ekfac_factors(model, loss_fn, params, train)``) runs only when
    the directory holds no complete statistics; its result (tensors, NamedTuples such as
    :class:`~dattri_fn.operators.kfac.KFACFactors`, dicts) is saved atomically
    (:func:`dattri_fn.io.save`), then a manifest marks it complete. A kill at any point leaves
    either no statistics (recomputed) or complete ones; no temp file survives the next call.

    Args:
        path: a directory for this statistic.
        compute: ``() -> state``.
        params: the params the statistics are taken at (hashed; must match on reuse).
        config: what else determines them (method, layers, damping-free settings...; JSON).
        map_location: as in :func:`dattri_fn.io.load`.

    Raises:
        ValueError: the directory holds statistics of another request (params hash, config key
            or kind), naming the field.
    """
    from . import io

    path = _directory("stats_store", path)
    if not callable(compute):
        raise TypeError(_msg("stats_store", "compute", "a callable () -> state", type(compute).__name__))
    request = {"format": FORMAT, "kind": "stats",
               "params_hash": params_hash(params, func="stats_store"),
               "config": _canonical(config, "stats_store")}
    path.mkdir(parents=True, exist_ok=True)
    clean_temps(path)
    man = _load_manifest("stats_store", path)
    if man is not None:
        _check_request("stats_store", man, request, arg_of={"params_hash": "params"})
        if man.get("complete"):
            return io.load(path / STATS, map_location=map_location)
    state = compute()
    io.save(state, path / STATS)
    _write_manifest(path, dict(request, complete=True, file=STATS, versions=_versions()))
    return state
