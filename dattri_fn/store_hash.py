"""Hashes and versions that bind a feature store to what produced it (see :mod:`dattri_fn.store`).

SHA-256 of params, method states and Batches, and the canonical JSON form of a caller's
``config``: a store records them, and a request that differs in any of them is refused.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ._checks import (
    _msg,
    batch_leaves,
)


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
    from torch.utils._pytree import TreeSpec, tree_flatten

    leaves, spec = tree_flatten(state)
    if getattr(type(state), "_fields", ())[-1:] == ("train_print",):
        # a guard on which rows score may take, not what scores depend on: hashed as before it
        # (a saved state's stores still match; a print formed late changes nothing)
        children = spec.children()
        leaves = leaves[:len(leaves) - children[-1].num_leaves]
        spec = TreeSpec(spec.type, spec.context, children[:-1])
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
