"""Gradients of per-example losses: the mean gradient and per-sample gradients by ``vmap``."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    batch_size,
    batch_to,
    blame_data,
    check_int,
    check_optional_int,
    check_params,
    iter_batches,
)
from .._types import Batch, Loss, Params
from ..tree import ravel_batched


def _first_device(params: Params) -> torch.device:
    return next(iter(params.values())).device


RANDOMNESS = ("error", "different", "same")


def check_randomness(func: str, randomness: str, seed) -> None:
    """Raise unless ``randomness`` is one of :data:`RANDOMNESS` and ``seed`` None or an int >= 0."""
    if randomness not in RANDOMNESS:
        raise ValueError(f"{func}(randomness=...): expected one of {list(RANDOMNESS)}, got "
                         f"{randomness!r}.")
    if seed is not None:
        check_int(func, "seed", seed, minimum=0)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Run with the RNG forked and seeded (CPU and ``device``'s CUDA generator), so a loss that
    samples (dropout) draws the same values on every call; the caller's RNG is untouched.
    ``None``: no change."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _random_error(func: str, err: RuntimeError, takes_randomness: bool = True,
                  arg: str | None = None) -> Exception | None:
    """A ValueError naming ``func`` for vmap's refusal of a loss that samples (None for any
    other error). ``takes_randomness=False``: ``func`` has no ``randomness`` argument (an inner
    call of a method), so the text names the loss, and it is marked ``blamed``: the public
    boundary's ``blame_data`` re-words it with the method's own name; ``arg``: the method's own
    argument the loss came as (``less(target=...)``), named as it is, not re-worded."""
    if "randomness" not in str(err):
        return None
    if takes_randomness:
        return ValueError(f"{func}(randomness=...): expected randomness='different' (one draw "
                          f"per example) or 'same' (one draw shared by the batch) for a loss "
                          f"that samples (dropout...), got 'error' ({err}). Pass seed= too for "
                          f"the same draws on every call; for a module left in training mode "
                          f"with Dropout, call module.eval() instead (deterministic gradients).")
    clear = ValueError(f"{func}({arg or 'loss'}=...): expected a loss that draws no random numbers "
                       f"(deterministic per-example gradients), got one that samples "
                       f"(dropout, e.g. F.dropout(x, p, training=module.training)) ({err}). "
                       f"Call module.eval() before building the method; to average over "
                       f"dropout masks, wrap it in dropout_members(lambda mask: ...(mask(loss)), "
                       f"n_masks=...).")
    if arg is None:
        clear.blamed = (func, "loss")
    return clear


class VmapRefusal(ValueError, RuntimeError):
    """vmap's refusal of a model, named. Still a RuntimeError: code that caught torch's own
    error to loop over examples itself keeps doing so."""


class Refuse(NamedTuple):
    """The public ``func(arg=...)`` a vmap refusal is raised under. ``capture``: whether ``func``
    takes the FunctionalModel's per-layer capture (the remedy), or vmaps every model (LESS,
    DVEmb, SOURCE: the remedy is a vmappable forward). A plain ``(func, arg)`` is one too."""

    func: str
    arg: str
    capture: bool = True


def vmap_refusal(func: str, arg: str, err: RuntimeError, *, capture: bool = True
                 ) -> VmapRefusal:
    """vmap's refusal of a model (a stock HF Llama/GPT-2 given an attention mask: ``.item()``
    in its mask helpers) as ``func(arg=...)``, with the remedy: the FunctionalModel's
    per-layer capture runs the model batched, without vmap (RU2 M2); ``capture=False``: ``func``
    vmaps every model, so the forward itself must change (or another method be used)."""
    if not capture:
        # the main trigger's fix first: the user cannot rewrite HF's mask helpers (review RF L1)
        hf = ("a Hugging Face model given an attention mask (.item() in its mask helpers) runs "
              "when loaded with attn_implementation='eager'; else rewrite the forward without "
              ".item() or a Python branch on a tensor's value (torch.where)")
        fix = (f"GradSpec vmaps {arg} per example for every model (DVEmb's recorded gradients "
               f"have no per-layer capture): {hf}." if func == "GradSpec" else
               f"{func} vmaps {arg} per example for every model, a FunctionalModel too (it has "
               f"no per-layer capture): {hf}, or use a method whose per-layer capture needs no "
               "vmap (grad_dot(fm), trak(fm)).")
    elif func in ("per_sample_grad", "grad"):
        rows = ".to_dense() gives these rows" if func == "per_sample_grad" else \
            "for one batch, .to_dense()[0].mean(0) is this mean gradient"
        fix = ("Pass the FunctionalModel to per_sample_layer_grads(fm, params, batch) instead "
               f"({rows}): its per-layer capture needs no vmap.")
    else:
        fix = (f"Pass the FunctionalModel itself ({func}(fm), not {func}(fm.loss))"
               if arg == "loss" else f"Pass the FunctionalModel itself ({arg}=fm, not "
               f"{arg}=fm.loss)") + ": its per-layer capture needs no vmap."
    return VmapRefusal(_msg(func, arg, "a loss torch.func.vmap can run per example",
                           f"vmap's refusal of the model: {str(err).splitlines()[0][:160]}...",
                           fix))


def _refused(err: RuntimeError) -> bool:
    """Whether ``err`` is vmap's refusal of the model (not of a loss that samples)."""
    return str(err).startswith("vmap:") and "randomness" not in str(err)


@contextlib.contextmanager
def refusing(refuse: Refuse | tuple | None):
    """Re-raise vmap's refusal of the model inside as :func:`vmap_refusal` under ``refuse``
    (for a raw ``vmap`` of the user's loss with no loop to fall back to); None: unchanged."""
    try:
        yield
    except RuntimeError as e:
        if refuse is None or isinstance(e, VmapRefusal):
            raise
        r = Refuse(*refuse)
        clear = _random_error(r.func, e, False, r.arg)
        if clear is None and not _refused(e):
            raise
        raise clear or vmap_refusal(r.func, r.arg, e, capture=r.capture) from e


def summed_loss(func: str, loss: Loss, params: Params, batch: Batch,
                randomness: str = "error", takes_randomness: bool = True) -> Tensor:
    """Return ``sum_i loss(params, x_i)``; raise naming ``func(loss=...)`` unless each is 0-d.

    Without the check a ``[K]``-valued loss would be differentiated as the sum of its outputs.
    ``takes_randomness``: whether ``func`` has a ``randomness`` argument the error may name.
    """
    try:
        out = vmap(loss, in_dims=(None, 0), randomness=randomness)(params, batch)
    except RuntimeError as err:
        clear = _random_error(func, err, takes_randomness)
        if clear is None:
            raise
        raise clear from err
    if not isinstance(out, Tensor) or out.ndim != 1:
        got = (f"output shape {list(out.shape[1:])} per example" if isinstance(out, Tensor)
               else type(out).__name__)
        raise ValueError(f"{func}(loss=...): expected a per-example function returning a 0-d "
                         f"Tensor for ONE example, got {got}. Reduce it to a scalar, e.g. "
                         f".sum() or a margin.")
    return out.sum()


def _summed_loss(loss: Loss):
    def total(params: Params, batch: Batch) -> Tensor:
        return summed_loss("grad", loss, params, batch, takes_randomness=False)

    return total


def grad(loss: Loss, params: Params, data, *, flat: bool = True) -> Tensor | Params:
    """Return the gradient of the mean loss ``(1/N) sum_i grad loss(params, x_i)``.  # -> [P]

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]``.
        params: the point of differentiation, ``dict[str, Tensor]``.
        data: one Batch or a re-iterable of Batches (list, DataLoader); N counts all examples.
        flat: return the raveled ``[P]`` vector (dict order) instead of a params-shaped dict.

    Raises:
        TypeError/ValueError: naming the argument, for a bad params dict or batch.
    """
    check_params("grad", "params", params)
    device = _first_device(params)
    total_grad = torch.func.grad(_summed_loss(loss))
    acc, n = None, 0
    for batch in iter_batches("grad", "data", data, ordered=False):  # a sum over rows
        n += batch_size("grad", "data", batch)
        with blame_data("grad", "data", batch), refusing(("grad", "loss")):
            g = total_grad(params, batch_to(batch, device))
        acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
    if acc is None:
        raise ValueError("grad(data=...): expected at least one batch, got an empty iterable.")
    mean = {k: v / n for k, v in acc.items()}
    return torch.cat([v.reshape(-1) for v in mean.values()]) if flat else mean


def per_sample_grad(loss: Loss, params: Params, batch: Batch, *, chunk_size: int | None = None,
                    flat: bool = True, randomness: str = "error",
                    seed: int | None = None) -> Tensor | Params:
    """Return every example's gradient ``G[i] = grad loss(params, x_i)``.  # -> [B, P]

    Computed by ``vmap(grad(loss))`` over the leading dim of every leaf of ``batch``.

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]``.
        params: ``dict[str, Tensor]``; rows of the result follow its ravel order.
        batch: a Tensor, tuple/list or dict of Tensors with leading dim ``B``; integer labels ok.
        chunk_size: examples per vmap call (bounds memory to ``chunk_size x P``); None = all.
        flat: return ``[B, P]``; otherwise ``{name: [B, *shape]}``.
        randomness: for a loss that samples (dropout): ``"different"`` draws per example,
            ``"same"`` one draw for the batch (``torch.func.vmap``'s modes); ``"error"`` refuses.
        seed: draw from a forked generator seeded so (the same draws on every call, the
            caller's RNG untouched); None: the global generator.

    Raises:
        TypeError/ValueError: naming the argument, for a bad params dict, batch, chunk_size,
            randomness or seed; a loss that samples under ``randomness="error"``.

    Example:
        >>> G = per_sample_grad(loss, params, (x, y))      # [B, P]
        >>> G @ per_sample_grad(loss, params, (xt, yt)).T  # Grad-Dot scores [B, B_test]
    """
    check_params("per_sample_grad", "params", params)
    batch_size("per_sample_grad", "batch", batch)
    check_optional_int("per_sample_grad", "chunk_size", chunk_size)
    check_randomness("per_sample_grad", randomness, seed)
    device = _first_device(params)
    with blame_data("per_sample_grad", "batch", batch), seeded(seed, device):
        grads = per_sample_grad_unchecked(loss, params, batch_to(batch, device),
                                          chunk_size=chunk_size, randomness=randomness,
                                          takes_randomness=True,
                                          refuse=("per_sample_grad", "loss"))
    return ravel_batched(grads) if flat else grads


def per_sample_grad_unchecked(loss: Loss, params: Params, batch: Batch, *,
                              chunk_size: int | None = None,
                              func: str = "per_sample_grad", randomness: str = "error",
                              takes_randomness: bool = False,
                              refuse: Refuse | tuple | None = None) -> Params:
    """:func:`per_sample_grad` as a dict, without validation: for inner loops.  # {name: [B, ...]}

    ``func``: the public caller named by the error for a non-scalar loss. ``takes_randomness``:
    whether the error for a loss that samples may name ``func(randomness=...)`` (inner loops of
    a method: no, it names the loss and is re-worded at the method's boundary). ``refuse``:
    the :class:`Refuse` (public call, argument) that vmap's refusal of the model (``.item()``, data-dependent
    control flow) is re-raised under, for a caller with no loop to fall back to; None: raised
    as torch's RuntimeError (callers that fall back catch it).
    """
    try:
        return vmap(torch.func.grad(loss), in_dims=(None, 0), chunk_size=chunk_size,
                    randomness=randomness)(params, batch)
    except RuntimeError as e:
        if takes_randomness or refuse is None:
            clear = _random_error(func, e, takes_randomness)
        else:  # a method's plain loss: its own argument named (less(target=...))
            clear = _random_error(refuse[0], e, False, refuse[1])
        if clear is not None:
            raise clear from e
        if refuse is not None and _refused(e):
            r = Refuse(*refuse)
            raise vmap_refusal(r.func, r.arg, e, capture=r.capture) from e
        if "scalar" not in str(e):
            raise
        # a method's own name and argument where it gave them (less(target=...)), else func's
        who = f"{func}(loss=...)" if refuse is None else "{}({}=...)".format(*refuse[:2])
        raise ValueError(f"{who}: expected a per-example function (loss or target) returning "
                         f"a 0-d Tensor for ONE example, got a non-scalar output ({e}). Reduce "
                         "it to a scalar, e.g. .sum() or a margin.") from e
