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
the parameter count), and GPT-2 reads ``wpe`` with position ids of shape ``[1, T]``, shared by
the batch, which the capture engine cannot split by example (it is not batch-first), so its
per-example gradients need autodiff here anyway.

Per-example gradients come from ``vmap(grad)`` of the one-example loss with only these params
differentiated (the others are constants), a block of rows at a time so that a block holds
about ``2**20`` gradient entries (``max(1, 2**20 // p)`` examples for ``p`` such entries: an
embedding table here costs one example's ``[V, d]`` gradient or a few, never a chunk's); a
model vmap cannot run (data-dependent control flow) is looped over, one backward pass per
example, after one warning. The pass reads the
data once more, chunk by chunk as the factor passes do, so ``fisher="true"`` draws the same
targets as they do (same generator, same outputs, same order).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .._checks import _msg, batch_size, regroup
from ..transforms.layers import _chunks, tree_unsqueeze
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
        out = functional_call(module, {**state, **r}, tree_unsqueeze(args),
                              tree_unsqueeze(kwargs))
        return loss_fn(out) if target is None else loss_fn(out, tree_unsqueeze(target))

    return one


def _drawn(module: nn.Module, loss_fn, state, args, kwargs, target):
    """Return ``(loss_fn, target)``: a ``_SampledLoss``'s plain loss and the targets it draws from
    the chunk's batched output (its statistics pass's draws); any other loss as given."""
    if not isinstance(loss_fn, _SampledLoss):
        return loss_fn, target
    with torch.no_grad():
        out = functional_call(module, state, args, kwargs)
    detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
    return loss_fn.loss_fn, loss_fn.sampler(detached, target, loss_fn.generator)


def diagonal_rows(module: nn.Module, loss_fn, state, keys, args, kwargs, target, *,
                  func: str = "ekfac_factors", looped: list | None = None) -> dict[str, Tensor]:
    """Per-example gradients of ``keys`` on one chunk of examples.  # {key: [B, *shape]}

    ``loss_fn``: the factor pass's loss (the observed targets, or a ``_SampledLoss`` whose
    targets are drawn here from the chunk's batched output, as its statistics pass draws them).
    ``looped``: a list one pass shares over its chunks; vmap's refusal of the model is recorded
    in it, so that the pass warns once and loops without trying vmap again.
    """
    loss_fn, target = _drawn(module, loss_fn, state, args, kwargs, target)
    r = {k: state[k] for k in keys}
    one = _example_loss(module, loss_fn, state)
    looped = [] if looped is None else looped
    try:
        if not looped:
            return vmap(grad(one), in_dims=(None, 0, 0, 0 if target is not None else None))(
                r, args, kwargs, target)
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        looped.append(True)
        warnings.warn(f"{func}(params=...): vmap cannot run this model ({str(err)[:160]}); the "
                      "per-example gradients of the params outside the Kronecker layers are "
                      "taken by one backward pass per example.", stacklevel=4)
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
        n += batch_size(func, "data", batch)
        for args, kwargs, target in _chunks(batch, chunk_size):
            for _, rows in diagonal_row_blocks(module, loss_fn, state, keys, args, kwargs,
                                               target, func=func, looped=looped):
                for k in list(rows):
                    sq = rows.pop(k).detach().square_().sum(0)  # [b, *shape] freed as it goes
                    sums[k] = sq if k not in sums else sums[k].add_(sq)
    if n == 0:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    return sums, n
