"""Influence's per-layer captured pass over a batch for K-FAC/EK-FAC states
(:func:`layer_pass`): each Kronecker layer's ``a``, ``g`` as its ``g`` arrives, zero rows for
a layer the batch does not call (where autograd confirms the loss reads none of its params),
then the per-example rows of the inverse's diagonal groups.

Moved from :mod:`.influence_score` (stop 25, no behaviour change); it re-exports
:func:`layer_pass`.
"""

from __future__ import annotations

import torch

from .._checks import _msg, batch_leaves, batch_slice
from .._types import Params
from ..model import default_unpack
from ..module_call import call_module
from ..operators import kfac
from ..operators.kfac_diag import diagonal_row_blocks
from ..transforms import capture
from ..transforms.layers import streamed_io, summed_losses
from .influence_config import InfluenceConfig, InfluenceState


def _unreached(eigen, kron, seen, start: int, b: int, step) -> None:
    """``step(start, layer, a, 0)`` for each Kronecker layer whose output never reached the loss
    on this chunk (an unused output, a layer run under ``torch.no_grad``): no ``g`` arrived, so
    every example's gradient of it is zero. ``a``, ``g`` are zeros as wide as the layer's
    factors (its bias column included), which every consumer takes unaugmented."""
    for layer in kron:
        if layer not in seen:
            QA, QG = eigen[0][layer], eigen[1][layer]
            step(start, layer, QA.new_zeros(b, QA.shape[0]), QG.new_zeros(b, QG.shape[0]))


_NOT_CALLED = "not called in this forward"


class _Retaps(dict):
    """``{(a state's capture's layers, uncalled layers): that capture without them}``, each
    built once a call (kept in ``looped``)."""


def _unread(cfg: InfluenceConfig, state, keys, args, kwargs, target) -> bool:
    """Whether the loss on these rows does not read ``keys`` at all: autograd finds no path
    from any of them (``allow_unused`` gives None), so every example's gradient of them is 0.
    A weight that reached a layer call as a copy (which the capture also calls "not called")
    has a path, and so is not taken as zero."""
    live = {k: state[k].detach().requires_grad_(True) for k in keys}
    with torch.enable_grad():
        out = call_module(cfg.model.module, {**state, **live}, args, kwargs)
        value = summed_losses(cfg.model.loss_fn, out, target)
        if not value.requires_grad:
            return True
        return all(g is None for g in torch.autograd.grad(value, list(live.values()),
                                                           allow_unused=True))


def _without_uncalled(cfg: InfluenceConfig, tapped, kron, err, state, args, kwargs, target,
                      arg: str, looped: list):
    """The state's capture without the Kronecker layers that ``err`` (the capture's refusal
    of this chunk) names as not called, where the loss reads none of their params on these
    rows (:func:`_unread`): their gradient rows are zero (:func:`_unreached` steps them).
    Anything else the capture refused is re-raised naming ``arg``."""
    tied = {m for group in getattr(tapped, "tied", ()) for m in group}
    specs = tapped.specs
    uncalled = [n for n, why in err.problems.items()
                if n in kron and n not in tied and why.startswith(_NOT_CALLED)]
    keys = [k for n in uncalled for k in (specs[n].weight, specs[n].bias) if k is not None]
    if len(uncalled) < len(err.problems) or not _unread(cfg, state, keys, args, kwargs, target):
        raise ValueError(_msg(cfg.name, arg, "batches on which the capture engine can take "
                              "every Kronecker layer of the state (a layer no call of which "
                              "reads its params gives zero gradient rows)",
                              f"a batch on which it cannot: {err}",
                              "Score batches the state's layers can be captured on, or prepare "
                              "the state with those layers' params left out.")) from err
    retaps = next((m for m in looped if isinstance(m, _Retaps)), None)
    if retaps is None:
        retaps = _Retaps()
        looped.append(retaps)
    # an ensemble's checkpoints may hold different Kronecker layers (each its own check)
    key = (tuple(tapped.layers), frozenset(uncalled))
    if key not in retaps:
        retaps[key] = capture.tap(cfg.model.module,
                                  [n for n in tapped.layers if n not in key[1]], tied=True)
    return retaps[key]


def layer_pass(cfg: InfluenceConfig, p: Params, st: InfluenceState, batch, step,
               looped: list | None = None, arg: str = "train") -> None:
    """``step(start, layer, a, g)`` for the layers ``st.ihvp`` covers, each as its ``g``
    arrives in batched backward passes of ``chunk_size`` rows (one layer's ``g`` alive at a
    time), through the state's captured forward; then ``step(start, group, None, rows)`` for
    each diagonal group of the inverse (params outside the Kronecker layers,
    :mod:`~dattri_fn.operators.kfac_diag`): ``rows`` ``[b, p]`` their per-example gradients,
    a block of ``b`` rows at a time (``start``: its first row; ~2**20 entries a block).
    ``looped``: a list shared by every batch of one score/self_score call, where vmap's refusal
    of the model is recorded (one warning per call, vmap not retried per batch). A Kronecker
    layer that is not called on a chunk (a branch the data skips) gets zero rows there where
    autograd confirms the loss reads none of its params; else the error names ``arg`` (the
    public argument the batch came from)."""
    model = cfg.model
    kron = list(st.ihvp.eigen[0])
    diagonal = getattr(st.ihvp, "diagonal", {})
    tapped = st.tap if st.tap is not None or not kron else kfac.kfac_tap(
        model.module, p, layers=kron)  # a state built by hand
    state = {**model.fixed, **p}
    like = next(iter(p.values()))
    unpack = model.unpack or default_unpack
    # the pipeline's collect / _train_blocks / stream_self checked the batch (batch_size): its
    # rows read without a second finiteness scan
    n = batch_leaves(batch)[0].shape[0]
    size = n if cfg.chunk_size is None else cfg.chunk_size
    looped = [] if looped is None else looped
    for start in range(0, n, size):
        args, kwargs, target = unpack(batch if size >= n else batch_slice(batch, start,
                                                                          start + size))
        seen: set[str] = set()
        use = tapped
        while kron:
            # a tied weight's members reach step as their one pooled layer (kfac_tied)
            at, _ = kfac.tied_steps(use, lambda layer, a, g, start=start, seen=seen: (
                seen.add(layer), step(start, layer, a, g)))
            try:
                # shapes=None: a probe per layer call, shaped as its output (no extra forward)
                if use.layers:
                    streamed_io(use, model.loss_fn, state, args, kwargs, target, None, like, at)
                break
            except capture.CaptureError as err:  # raised by the forward, before any step
                if use is not tapped or seen:
                    raise
                use = _without_uncalled(cfg, tapped, kron, err, state, args, kwargs, target,
                                        arg, looped)
        if kron:
            _unreached(st.ihvp.eigen, kron, seen, start, min(size, n - start), step)
        if diagonal:
            keys = [k for ks, _ in diagonal.values() for k in ks]
            # blocks of ~2**20 gradient entries (kfac_diag): step sees a group's rows from
            # ``start + r`` on
            for r, rows in diagonal_row_blocks(model.module, model.loss_fn, state, keys, args,
                                               kwargs, target, func=cfg.name, looped=looped):
                for group, (ks, _) in diagonal.items():
                    with torch.no_grad():
                        g = torch.cat([_flat_rows(rows.pop(k).detach()) for k in ks], 1)
                    step(start + r, group, None, g)


def _flat_rows(v: torch.Tensor) -> torch.Tensor:
    """Per-example rows ``[b, ...] -> [b, numel / b]`` (a 0-d param's rows are ``[b]``)."""
    return v.reshape(v.shape[0], -1)
