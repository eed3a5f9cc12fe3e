"""K-FAC/EK-FAC's block for the params outside every Kronecker layer: the exact Fisher diagonal.

A param that no selected ``nn.Linear``, ``Conv1D`` or ``Conv2d`` owns (a LayerNorm's scale and
shift, GPT-2's positional ``wpe``, a tied weight that cannot be pooled, a bias whose layer's
weight is not attributed) has no Kronecker structure to factor. Its block of the Fisher is
approximated by the diagonal, taken exactly from per-example gradients ``g_n`` of those params:

    D = (1/N) sum_n g_n^2          (elementwise; the empirical, or with ``fisher="true"`` the
                                    sampled-target, Fisher's diagonal)
    (D + damping)^-1               (its damped inverse, elementwise)

This is EK-FAC's own rule in the identity basis (``Lambda = E[(Q^T g)^2]`` with ``Q = I``), so
the same block serves K-FAC and EK-FAC; the whole operator stays block-diagonal: the Kronecker
layers' blocks, then one diagonal block per module holding such params (its "group", named
after the module). Self-influence of example ``i`` adds ``sum g_i^2 / (D + damping)``.

An ``nn.Embedding`` that is not tied (``wpe``, an untied ``wte``) takes this block too. As a
Kronecker layer in the Linear layout (``DW = sum_s e_{id_s} u_s^T``) its vocabulary-side factor
is ``diag(counts)``, so EK-FAC's basis there is the identity and its only gain over this block
is the rotation of the ``d`` side by ``A``'s eigenvectors; against that, the K-FAC state keeps
that factor dense at ``[V, V]`` (2.5e9 entries for a 50257-token vocabulary; this block costs
the parameter count).

Per-example gradients come from ONE batched forward and backward per chunk through the capture
engine (:mod:`dattri_fn.transforms.capture`) wherever a key is a weight or bias of a capturable
layer: a LayerNorm (``dW_n = sum_t g_nt * xhat_nt``, ``db_n = sum_t g_nt``), an Embedding (GPT-2's
``wpe`` too, whose ``[1, T]`` position ids are shared by the batch: captured where its output
is broadcast over it), a Linear / Conv1D / Conv2d left out of the Kronecker layers or a bias
without its weight. The rows are formed from the captured ``(a, g)`` a block at a time, so that a
block holds about ``2**20`` gradient entries (``max(1, 2**20 // p)`` examples for ``p`` such
entries: an embedding table here costs one example's ``[V, d]`` gradient or a few, never a
chunk's). The other keys (a bare ``nn.Parameter``, a layer the capture cannot represent on
this chunk: a tied weight read by two layers, a LayerNorm on a sequence-first input, ...; one
warning names the layers and why) come from ``vmap(grad)`` of the one-example loss with only
them differentiated; a model vmap cannot run (data-dependent control flow, GPT-2 with an
attention mask) is looped over, one backward pass per example, after one warning. The pass
reads the data once more, chunk by chunk as the factor passes do, so ``fisher="true"`` draws
the same targets as they do (same generator, same outputs, same order).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from .._checks import _msg, batch_size, regroup
from ..module_call import call_module
from ..transforms import capture
from ..transforms.layers import _chunks, batched_io, tree_unsqueeze
from .kfac_fisher import _ExpectedLoss, _SampledLoss

__all__ = ["diagonal_groups", "diagonal_row_blocks", "diagonal_rows", "diagonal_sums",
           "warn_outside"]

# Entries of one block of per-example gradients (rows x the keys' numel): a chunk is vmapped a
# block of rows at a time, so an embedding table in this block holds [rows, V d] at ~8 MiB
# (float64), not [chunk, V d] (an untied 50257 x 768 table: 9.9 GB a 64-row chunk in float32).
_DIAG_ENTRIES = 2**20


def diagonal_groups(keys, taken=()) -> dict[str, tuple[str, ...]]:
    """``{group: keys}``: the keys grouped by the module holding them (a group is named after
    it, or after the key where that name is a Kronecker layer's in ``taken`` or empty)."""
    out: dict[str, list[str]] = {}
    for k in keys:
        holder = k.rpartition(".")[0]
        out.setdefault(holder if holder and holder not in taken else k, []).append(k)
    return {g: tuple(ks) for g, ks in out.items()}


def warn_outside(func: str, why: dict[str, str]) -> None:
    """The one warning of a factor pass whose params include keys outside its Kronecker layers
    (``why``: key -> reason; the keys are listed under each reason)."""
    by: dict[str, list[str]] = {}
    for k, w in why.items():
        by.setdefault(w, []).append(k)
    listed = "; ".join(f"{w}: {ks}" for w, ks in by.items())
    warnings.warn(f"{func}(params=...): {len(why)} params are outside the Kronecker-factored "
                  f"layers ({listed}); their block is their exact Fisher diagonal E[g^2] from "
                  "per-example gradients (one more pass over the data), combined "
                  "block-diagonally with the Kronecker blocks. Pass others='diagonal' to "
                  "accept this without the warning, or others='error' to refuse these params.",
                  stacklevel=4)


def _example_loss(module: nn.Module, loss_fn, state):
    """``(r, args, kwargs, target) -> loss`` of ONE example (a batch of one) at ``state | r``."""
    def one(r, args, kwargs, target):
        out = call_module(module, {**state, **r}, tree_unsqueeze(args),
                          tree_unsqueeze(kwargs))
        return loss_fn(out) if target is None else loss_fn(out, tree_unsqueeze(target))

    return one


def _drawn(module: nn.Module, loss_fn, state, args, kwargs, target):
    """Return ``(loss_fn, target)``: a ``_SampledLoss``'s plain loss and the targets it draws from
    the chunk's batched output (its statistics pass's draws); any other loss as given."""
    if not isinstance(loss_fn, _SampledLoss):
        return loss_fn, target
    with torch.no_grad():
        out = call_module(module, state, args, kwargs)
    detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
    return loss_fn.loss_fn, loss_fn.sampler(detached, target, loss_fn.generator)


class _Uncaptured(NamedTuple):
    """What one pass learnt about the layers the capture cannot take (kept in ``looped``)."""

    why: dict  # layer -> the capture engine's reason
    taps: dict  # layers -> their tap (built once a pass)
    checked: list  # [True] once the pass's first captured rows met autodiff (kfac_check)


def _owners(module: nn.Module, keys) -> tuple[dict[str, capture.LayerSpec], dict[str, str | None]]:
    """``({layer: spec}, {layer: key})``: the capturable layers (LayerNorms included) reading
    one of ``keys`` as weight or bias, module order, and the key each reads as its weight (a
    weight tied between an Embedding and a Linear is read by both: its gradient is their sum)."""
    named = dict(module.named_parameters(remove_duplicate=False))
    by_tensor = {id(named[k]): k for k in keys if k in named}
    specs, weight = {}, {}
    for n, s in capture.layer_specs(module, norms=True).items():
        w = by_tensor.get(id(named[s.weight])) if s.weight in named else None
        if w is not None or s.bias in keys:
            specs[n], weight[n] = s, w
    return specs, weight


def _captured_rows(module: nn.Module, loss_fn, state, keys, args, kwargs, target, func: str,
                   looped: list) -> dict[str, Tensor]:
    """Per-example gradients of the ``keys`` that capturable layers own, from ONE batched
    forward and backward (module docstring); a layer the capture refuses on these rows is left
    out (its keys are missing from the result; ``looped`` records why, for the warning of a
    per-example loop)."""
    memo = next((m for m in looped if isinstance(m, _Uncaptured)), None)
    if memo is None:
        memo = _Uncaptured({}, {}, [])
        looped.append(memo)
    owners, weight = _owners(module, keys)
    tied = len(set(filter(None, weight.values()))) < len(list(filter(None, weight.values())))
    layers = [n for n in owners if n not in memo.why]
    io = {}
    while layers:
        tapped = memo.taps.get(tuple(layers))
        if tapped is None:
            tapped = memo.taps.setdefault(tuple(layers), capture.tap(module, layers, tied=tied))
        try:
            io = batched_io(tapped, loss_fn, state, args, kwargs, target, None, state[keys[0]])
            break
        except RuntimeError as err:
            if "does not require grad" not in str(err):
                raise
            # the loss reaches no param at all (these layers run under torch.no_grad, their
            # outputs unused...): every example's gradient of every key is zero
            B = batch_size(func, "data", (*args, *kwargs.values()))
            return {k: state[k].new_zeros(B, *state[k].shape) for k in keys}
        except capture.CaptureError as err:
            new = {n: why for n, why in err.problems.items() if n in owners}
            if not new:
                raise
            memo.why.update(new)  # named by the loop's warning, where the fallback costs
            layers = [n for n in layers if n not in new]
    for n, (a, _) in list(io.items()):
        if owners[n].kind == "embedding" and a.ndim == 1:
            # one id per row: examples, or positions [T] with T = B that a later op broadcasts
            # (unsqueeze, expand, ...) and that no shape tells apart: autodiff, on every chunk
            memo.why[n] = "its ids are one per row ([B]): they may be positions with T = B"
            del io[n]
    wanted = set(keys)
    rows: dict[str, Tensor] = {}
    with torch.no_grad():
        for n, (a, g) in io.items():
            spec, key = owners[n], weight[n]
            if key is not None:  # a tied weight: the sum over its layers (capture.tap)
                dw = capture.weight_grad(spec, a, g, state[key].shape)
                rows[key] = dw if key not in rows else rows[key].add_(dw)
            if spec.bias in wanted:
                rows[spec.bias] = capture.bias_grad(spec, g).reshape(
                    g.shape[0], *state[spec.bias].shape)
    if io and not memo.checked:
        memo.checked.append(True)
        _check_rows(module, loss_fn, state, owners, weight, io, rows, args, kwargs, target, memo)
    return rows


def _check_rows(module: nn.Module, loss_fn, state, owners, weight, io, rows, args, kwargs,
                target, memo: _Uncaptured) -> None:
    """Once a pass, on its first chunk: the first 2 captured rows of each layer read at
    positions (a dim other than the examples' could equal B: a sequence-first ``[S, B, d]``
    input with ``S = B``) against autodiff (:func:`~.kfac_check.differing`); a layer that
    differs is recorded in ``memo.why`` (autodiff from now on, named by the loop's warning)
    and its keys dropped from ``rows``."""
    from .kfac_check import differing

    owned = {n: [k for k in (weight[n], owners[n].bias) if k in rows] for n in io}
    seq = [n for n, (a, _) in io.items()
           if a.ndim > (1 if owners[n].kind == "embedding" else 2) and owned[n]]
    if not seq:
        return
    bad = differing(module, loss_fn, state, {k: rows[k][:2] for n in seq for k in owned[n]},
                    args, kwargs, target)
    for n in seq:
        why = next((bad[k] for k in owned[n] if k in bad), None)
        if why is not None:
            memo.why[n] = why
            for k in owned[n]:
                rows.pop(k, None)


def diagonal_rows(module: nn.Module, loss_fn, state, keys, args, kwargs, target, *,
                  func: str = "ekfac_factors", looped: list | None = None) -> dict[str, Tensor]:
    """Per-example gradients of ``keys`` on one chunk of examples.  # {key: [B, *shape]}

    The keys of capturable layers from one batched capture pass, the others by autodiff
    (module docstring). ``loss_fn``: the factor pass's loss (the observed targets, or a
    ``_SampledLoss`` whose targets are drawn here from the chunk's batched output, as its
    statistics pass draws them). ``looped``: a list one pass shares over its chunks; the layers
    the capture refused and vmap's refusal of the model are recorded in it, so that the pass
    warns once and neither retries the capture of those layers nor vmap.
    """
    loss_fn, target = _drawn(module, loss_fn, state, args, kwargs, target)
    keys = list(keys)
    looped = [] if looped is None else looped
    rows = _captured_rows(module, loss_fn, state, keys, args, kwargs, target, func, looped)
    rest = [k for k in keys if k not in rows]
    if rest:
        rows.update(_autodiff_rows(module, loss_fn, state, rest, args, kwargs, target, func,
                                   looped))
    return {k: rows[k] for k in keys}


def _owned(rows: Tensor) -> Tensor:
    """``rows`` with memory of their own: vmap's gradient of a key the loss never reads (an
    unused param, a layer skipped on this chunk) is zeros expanded over the examples (stride 0),
    which the consumers' in-place ops (``square_``) cannot write."""
    if any(s == 0 and n > 1 for s, n in zip(rows.stride(), rows.shape, strict=True)):
        return rows.contiguous()
    return rows


def _autodiff_rows(module: nn.Module, loss_fn, state, keys, args, kwargs, target, func: str,
                   looped: list) -> dict[str, Tensor]:
    """Per-example gradients of ``keys`` by ``vmap(grad)``, or one backward per example where
    vmap cannot run the model.  # {key: [B, *shape]}"""
    r = {k: state[k] for k in keys}
    one = _example_loss(module, loss_fn, state)
    try:
        if not any(m is True for m in looped):
            out = vmap(grad(one), in_dims=(None, 0, 0, 0 if target is not None else None))(
                r, args, kwargs, target)
            return {k: _owned(v) for k, v in out.items()}
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        looped.append(True)
        memo = next((m for m in looped if isinstance(m, _Uncaptured)), None)
        why = "; ".join(f"{n}: {w}" for n, w in memo.why.items()) if memo else ""
        warnings.warn(f"{func}(params=...): vmap cannot run this model ({str(err)[:160]}); the "
                      f"per-example gradients of {keys} (outside the Kronecker layers, "
                      + (f"in layers the capture engine cannot take: {why}" if why else
                         "in no layer the capture engine takes")
                      + ") are taken by one backward pass per example.", stacklevel=5)
    B = batch_size(func, "data", (*args, *kwargs.values()))
    rows = []
    for i in range(B):
        pick = lambda t, i=i: t[i] if isinstance(t, Tensor) else t  # noqa: E731
        live = {k: v.detach().requires_grad_(True) for k, v in r.items()}
        with torch.enable_grad():
            value = one(live, tree_map(pick, args), tree_map(pick, kwargs),
                        None if target is None else tree_map(pick, target))
            rows.append(torch.autograd.grad(value, list(live.values()), allow_unused=True,
                                            materialize_grads=True))
    return {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(r)}


def diagonal_row_blocks(module: nn.Module, loss_fn, state, keys, args, kwargs, target, *,
                        func: str = "ekfac_factors", looped: list | None = None):
    """Yield ``(first row, {key: [b, *shape]})``: :func:`diagonal_rows` of one chunk taken
    ``b = max(1, _DIAG_ENTRIES // numel(keys))`` examples at a time.

    A sampled loss draws the chunk's targets once, from the whole chunk's output (the factor
    passes' draws), before the chunk is split into blocks.
    """
    loss_fn, target = _drawn(module, loss_fn, state, args, kwargs, target)
    B = batch_size(func, "data", (*args, *kwargs.values()))
    rows = max(1, _DIAG_ENTRIES // max(1, sum(state[k].numel() for k in keys)))
    if rows >= B:
        yield 0, diagonal_rows(module, loss_fn, state, keys, args, kwargs, target, func=func,
                               looped=looped)
        return
    for r in range(0, B, rows):
        cut = lambda t, r=r: t[r:r + rows] if isinstance(t, Tensor) else t  # noqa: E731
        yield r, diagonal_rows(module, loss_fn, state, keys, tree_map(cut, args),
                               tree_map(cut, kwargs),
                               None if target is None else tree_map(cut, target), func=func,
                               looped=looped)


def diagonal_sums(func: str, module: nn.Module, loss_fn, state, keys, batches, chunk_size,
                  batch_rows=None) -> tuple[dict[str, Tensor], int]:
    """``({key: sum_n g_n^2}, N)`` over one pass of the data (the chunks of the factor passes).

    ``loss_fn``: the pass's loss from ``fisher_losses`` (a fresh one: a sampled loss's
    generator then starts where the factor passes' did).
    """
    if isinstance(loss_fn, _ExpectedLoss):
        raise ValueError(_msg(func, "fisher", "'empirical' or 'true' with params outside the "
                              "Kronecker layers (their diagonal block takes per-example "
                              "gradients)", f"'expected' with {list(keys)}",
                              "Use fisher='true', leave those params out, or pass "
                              "others='error' to find them."))
    sums: dict[str, Tensor] = {}
    n, looped = 0, []
    for batch in regroup(batches, batch_rows, func):
        n += batch_size(func, "data", batch, first=n)
        for args, kwargs, target in _chunks(batch, chunk_size):
            for _, rows in diagonal_row_blocks(module, loss_fn, state, keys, args, kwargs,
                                               target, func=func, looped=looped):
                for k in list(rows):
                    sq = rows.pop(k).detach().square_().sum(0)  # [b, *shape] freed as it goes
                    sums[k] = sq if k not in sums else sums[k].add_(sq)
    if n == 0:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    return sums, n
