"""K-FAC/EK-FAC on a tied weight: one tensor read by an ``nn.Embedding`` and an ``nn.Linear``.

GPT-2 ties ``transformer.wte.weight`` (an Embedding, ``[V, d]``) to ``lm_head.weight`` (a Linear
``d -> V``). Written in the Linear layout (``out = V``, ``in = d``) both uses are sums of
outer products of an "out" vector and an "in" vector, so example ``n``'s gradient is

    DW_n = sum_t g_t h_t^T  +  sum_s e_{id_s} u_s^T,

``h_t`` the head's input, ``g_t = dloss_n / dlogits_t`` (in ``R^V``), ``e_{id_s}`` the one-hot
of the token read at position ``s`` (zero where ``padding_idx`` takes no gradient) and
``u_s = dloss_n / d(embedding output)_s`` (in ``R^d``; both zero at a ``padding_idx``
position, which passes no gradient to ``W``). The pooled tokens ``(out, in)`` =
``(g_t, h_t)`` and ``(e_{id_s}, u_s)`` therefore play the part of one Linear layer's positions,
and every K-FAC/EK-FAC statistic is taken over them (:func:`pooled_io`):

    A = (1/N) sum_n (1/T_n) sum_{pooled k} in_k in_k^T          [d, d]
    G = (1/N) sum_n sum_{pooled k} out_k out_k^T                [V, V]  (the embedding's share
                                                                  is diag(token counts))
    Lambda = (1/N) sum_n (Q_G^T DW_n Q_A)^2                     [V, d]

with ``T_n`` the pooled positions (both uses' positions). EK-FAC is the sound version: its
``Lambda`` is taken from the EXACT per-example gradient (both uses summed), so in the
eigenbasis of the pooled factors its diagonal is exactly the empirical Fisher's of ``W``
(only ``Q_A``, ``Q_G`` depend on the pooling). Plain K-FAC on the pooled factors is
K-FAC-expand with the uses treated as further positions (Eschenhagen et al. 2023): as for a
Linear layer applied at several positions, ``A (x) G`` drops the cross terms between
positions and has no exactness property; it is offered as that approximation. kronfluence
tracks Linear/Conv2d modules only, so for a tied head it factors ``sum_t g_t h_t^T`` and drops
the embedding's share of the gradient.

The factor group is named after the member whose weight key is the params key (the first
holder in module order, the key ``named_parameters()`` keeps: ``transformer.wte``); it has no
bias column. A tied weight that cannot be pooled (a holder's bias among the params, two Linears
sharing a weight) is no Kronecker layer, whichever holder comes first: the K-FAC/EK-FAC
builders give it and that bias the diagonal block (:mod:`.kfac_diag`) or refuse it
(``others="error"``), and :func:`~dattri_fn.attribute.tokens.token_scores` refuses it.
``fisher="expected"`` is
refused: the embedding's "in" vectors are gradients, one per output direction, which the
pooled ``A`` cannot take once per example.

References:
    Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
    Architectures", 2023, arXiv:2311.00636.
    George et al. 2018, arXiv:1806.03884 (EK-FAC).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..transforms import capture

__all__ = ["PooledParts", "pooled_io", "pooled_parts", "tied_group", "tied_steps"]

_POOLED_KINDS = ("embedding", "linear")


def tied_group(module: nn.Module, key: str, params) -> tuple[str, ...] | str:
    """The layers (module order) whose uses of the tied param ``key`` K-FAC pools, or why not.

    Pooled: the tensor's holders are one ``nn.Embedding`` and one ``nn.Linear`` (distinct
    kinds, each reading it as its weight), ``key`` belongs to the first of them, and no
    holder's bias is among ``params``.
    """
    specs = capture.layer_specs(module)
    named = list(module.named_parameters(remove_duplicate=False))
    tensor = dict(named)[key]
    holders = [k for k, v in named if v is tensor]
    by_weight = {s.weight: n for n, s in specs.items()}
    members = [by_weight.get(k) for k in holders]
    if any(m is None for m in members):
        odd = [k for k, m in zip(holders, members, strict=True) if m is None]
        return f"{odd} not the weight of an nn.Embedding or nn.Linear"
    kinds = [specs[m].kind for m in members]
    if sorted(kinds) != sorted(_POOLED_KINDS):
        uses = ", ".join(f"{m!r} ({k})" for m, k in zip(members, kinds, strict=True))
        return f"its uses are {uses}, not one embedding and one linear use"
    order = list(specs)
    members.sort(key=order.index)
    if specs[members[0]].weight != key:
        return f"the key {key!r} is not the first holder's ({specs[members[0]].weight!r})"
    biased = [specs[m].bias for m in members if specs[m].bias in params]
    if biased:
        return f"the bias {biased} of a tied layer is among the params (leave it out)"
    return tuple(members)


def _out_in(kind: str, a: Tensor, g: Tensor, V: int) -> tuple[Tensor, Tensor]:
    """One use's pooled ``(out [B, T, V], in [B, T, d])`` vectors from its captured ``(a, g)``."""
    B = g.shape[0]
    if kind == "linear":  # (g_t, h_t)
        return g.reshape(B, -1, g.shape[-1]), a.reshape(B, -1, a.shape[-1])
    idx = a.reshape(B, -1)  # (e_{id_s}, u_s); -1 (padding_idx): no gradient, the pair (0, 0)
    keep = idx >= 0
    out = g.new_zeros(B, idx.shape[1], V).scatter_(2, idx.clamp_min(0)[..., None],
                                                    keep.to(g.dtype)[..., None])
    return out, g.reshape(B, -1, g.shape[-1]).masked_fill(~keep[..., None], 0)


def pooled_io(specs: Mapping[str, capture.LayerSpec], members, io: Mapping[str, tuple],
              V: int) -> tuple[Tensor, Tensor]:
    """Return ``(a, g)`` of a tied group as one Linear layer's positions.  # -> [B, T', d], [B, T', V]

    ``io[member] = (a, g)`` as captured (the embedding's ``a`` holds indices); ``T'`` is the
    sum of the members' positions, so that ``sum_k g_k a_k^T`` is the weight's gradient in the
    ``[V, d]`` layout (module docstring).
    """
    outs, ins = zip(*(_out_in(specs[m].kind, *io[m], V) for m in members), strict=True)
    return torch.cat(ins, 1), torch.cat(outs, 1)


class PooledParts(NamedTuple):
    """A tied group's positions kept by use, without one-hot vectors (:func:`pooled_parts`).

    ``h`` ``[B, T, d]`` and ``g`` ``[B, T, V]``: the Linear use's ``(in, out)``; ``ids``
    ``[B, S]`` (``-1`` where ``padding_idx`` takes no gradient) and ``u`` ``[B, S, d]`` (zero
    there): the Embedding use's, whose "out" vector is the one-hot ``e_{id}``. :func:`pooled_io`
    concatenates them as ``[h, u]`` and ``[g, one_hot(ids)]``.
    """

    h: Tensor
    g: Tensor
    ids: Tensor
    u: Tensor

    def ins(self) -> Tensor:
        """The pooled "in" vectors ``[h, u]``, as :func:`pooled_io`'s ``a``.  # [B, T + S, d]"""
        return torch.cat([self.h, self.u], 1)

    def gram(self) -> Tensor:
        """``sum_b sum_k out_bk out_bk^T`` = ``g^T g + diag(token counts)``.  # [V, V]

        The embedding's one-hot outer products are the counts of the ids read (``padding_idx``
        positions excluded) on the diagonal: a ``bincount``, not a ``[B S, V] x [B S, V]``
        product.
        """
        V = self.g.shape[-1]
        g2 = self.g.reshape(-1, V)
        out = g2.T @ g2
        ids = self.ids.reshape(-1)
        out.diagonal().add_(torch.bincount(ids[ids >= 0], minlength=V).to(out.dtype))
        return out

    def rotated_out(self, Q: Tensor, rows: slice) -> Tensor:
        """``out Q`` over the pooled positions of examples ``rows``: ``[g Q, Q[ids]]`` (the
        one-hot rows of ``Q`` gathered, zero at ``padding_idx``).  # -> [b, T + S, V]"""
        ids = self.ids[rows]
        picked = Q[ids.clamp_min(0)].masked_fill_((ids < 0)[..., None], 0)
        return torch.cat([self.g[rows] @ Q, picked], 1)


def pooled_parts(specs: Mapping[str, capture.LayerSpec], members, io: Mapping[str, tuple]
                 ) -> PooledParts:
    """A tied group's captured ``(a, g)`` per member as :class:`PooledParts` (no one-hot)."""
    head = next(m for m in members if specs[m].kind == "linear")
    emb = next(m for m in members if specs[m].kind == "embedding")
    a, g = io[head]
    B = g.shape[0]
    ids, u = io[emb]
    ids = ids.reshape(B, -1)
    keep = ids >= 0
    u = u.reshape(B, -1, u.shape[-1]).masked_fill(~keep[..., None], 0)
    return PooledParts(a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1]),
                       ids.masked_fill(~keep, -1), u)


def tied_steps(tapped, step: Callable, on_input: Callable | None = None,
               pooled: Callable | None = None):
    """Wrap a streamed pass's ``step(layer, a, g)`` (and ``on_input(layer, a)``) so that the
    members of each tied group of ``tapped`` (``tapped.tied``) reach them as ONE layer, named
    after the group's first member, with :func:`pooled_io`'s ``(a, g)``.

    The members' inputs and gradients are held until the last member's ``g`` arrives in the
    backward pass (the Embedding's, last); with ``on_input`` the group's ``on_input`` then
    runs in the backward pass too (its "in" vectors include the embedding's gradients). Other
    layers pass through. One wrapper per pass. ``pooled``: ``pooled(group, parts)`` takes a
    group's :class:`PooledParts` instead of ``on_input`` / ``step`` (the statistics passes:
    no one-hot vectors materialised).
    """
    groups = {ms[0]: ms for ms in getattr(tapped, "tied", ())}
    if not groups:
        return step, on_input
    owner = {m: grp for grp, ms in groups.items() for m in ms}
    held: dict[str, list] = {}  # member -> [a, g]

    def take_input(layer, a):
        if layer in owner:
            held[layer] = [a, None]
        elif on_input is not None:
            on_input(layer, a)

    def take_step(layer, a, g):
        grp = owner.get(layer)
        if grp is None:
            step(layer, a, g)
            return
        entry = held.setdefault(layer, [None, None])
        if a is not None:
            entry[0] = a
        entry[1] = g
        members = groups[grp]
        if any(held.get(m, (None, None))[1] is None for m in members):
            return
        parts = {m: held.pop(m) for m in members}
        if pooled is not None:
            pooled(grp, pooled_parts(tapped.specs, members, parts))
            return
        V = tapped.specs[next(m for m in members if tapped.specs[m].kind == "linear")].out_features
        a_p, g_p = pooled_io(tapped.specs, members, parts, V)
        if on_input is not None:
            on_input(grp, a_p)
            step(grp, None, g_p)
        else:
            step(grp, a_p, g_p)

    return take_step, (take_input if on_input is not None else None)
