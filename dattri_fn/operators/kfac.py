"""K-FAC and EK-FAC inverse-Fisher products for the Linear-like layers of a module.

Layers: ``nn.Linear``, Hugging Face ``Conv1D`` (weight ``[in, out]``: its blocks are read and
written transposed) and ``nn.Conv2d`` with ``groups = 1`` (``a`` = the unfolded patches, one
position per output pixel, as in KFC, Grosse & Martens 2016, arXiv 1602.01407), captured by
:mod:`dattri_fn.transforms.capture` (no trace, no hooks; the root module may be the layer).

For a layer with input ``a`` (augmented to ``[a, 1]`` when its bias is among the params)
and output-gradient ``g``, one example's gradient block of ``[W | b]`` is
``DW_n = sum_t g_nt a_nt^T``  (``[out, in(+1)]``; ``t`` runs over tokens, ``T = 1`` for 2-D
inputs). The empirical Fisher block ``F = (1/N) sum_n vec(DW_n) vec(DW_n)^T`` is approximated by

    K-FAC     F ~ A (x) G,   A = (1/N) sum_n (1/T) sum_t a_nt a_nt^T,
                             G = (1/N) sum_n sum_t g_nt g_nt^T,
    EK-FAC    F ~ (Q_A (x) Q_G) diag(Lambda) (Q_A (x) Q_G)^T,
              Lambda_ij = (1/N) sum_n (Q_G^T DW_n Q_A)_ij^2,

with ``Q_A``, ``Q_G`` the eigenvectors of ``A``, ``G``. Sequence convention ("expand", tokens
treated as independent, as in Grosse et al. 2023): ``A`` averages over tokens and ``G`` sums
over them, so that ``A (x) G = T * E_tok[a a^T] (x) E_tok[g g^T]``, the dense Fisher with the
cross-token terms dropped; for ``T = 1`` this is the usual K-FAC. The ``Lambda`` of EK-FAC does
not depend on this choice (only the eigenvectors of ``A`` and ``G`` enter).

The inverse is block-diagonal over layers; per layer (``M`` the layer's slice of a row of ``V``
reshaped to ``[out, in(+1)]``):

    M -> Q_G ((Q_G^T M Q_A) / (Lambda + damping)) Q_A^T,

with ``Lambda = s_G s_A^T`` (outer product of eigenvalues) for K-FAC, which makes it the exact
inverse of ``A (x) G + damping * I``. The raveled layout follows the params dict: the weight's
``out * in`` entries (row-major) and the bias's ``out`` entries sit wherever ``ravel`` puts them,
never as one concatenated ``[out, in + 1]`` block.

References:
    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", 2015, arXiv:1503.05671.
    George et al., "Fast Approximate Natural Gradient Descent in a Kronecker-factored
    Eigenbasis", 2018, arXiv:1806.03884.
    Grosse et al., "Studying Large Language Model Generalization with Influence Functions",
    2023, arXiv:2308.03296.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .._checks import (
    _msg,
    all_finite,
    batch_size,
    check_int,
    check_optional_int,
    check_params,
    check_positive,
    iter_batches,
    regroup,
)
from .._types import LinOp
from ..transforms import capture
from ..transforms.layers import _layer_io, layer_names, module_state

__all__ = ["KFACFactors", "EKFACFactors", "kfac_factors", "ekfac_factors", "kfac_tap",
           "ihvp_kfac", "ihvp_ekfac"]


class KFACFactors(NamedTuple):
    """K-FAC state: per-layer Kronecker factors and the raveled layout they act on.

    Fields:
        A: ``{layer: [in(+1), in(+1)]}`` input second moments (``+1`` when the bias is a param).
        G: ``{layer: [out, out]}`` output-gradient second moments.
        param_names: the selected params' names in ravel order (defines the operator's layout).
        num_examples: ``N``, the examples the factors average over (int64 scalar tensor).
        transposed: layers whose weight is stored ``[in, out]`` (Hugging Face ``Conv1D``).
    """

    A: dict[str, Tensor]
    G: dict[str, Tensor]
    param_names: tuple[str, ...]
    num_examples: Tensor
    transposed: tuple[str, ...] = ()


class EKFACFactors(NamedTuple):
    """EK-FAC state: per-layer Kronecker eigenbases, corrected eigenvalues and the layout.

    Fields:
        QA: ``{layer: [in(+1), in(+1)]}`` eigenvectors of ``A`` (columns).
        QG: ``{layer: [out, out]}`` eigenvectors of ``G`` (columns).
        Lambda: ``{layer: [out, in(+1)]}`` ``E[(Q_G^T DW_n Q_A)^2]``, the Fisher's diagonal in
            that basis.
        param_names: the selected params' names in ravel order.
        num_examples: ``N`` (int64 scalar tensor).
        transposed: layers whose weight is stored ``[in, out]`` (Hugging Face ``Conv1D``).
    """

    QA: dict[str, Tensor]
    QG: dict[str, Tensor]
    Lambda: dict[str, Tensor]
    param_names: tuple[str, ...]
    num_examples: Tensor
    transposed: tuple[str, ...] = ()


_KFAC_KINDS = ("linear", "conv1d", "conv2d")


def _keys(layer: str) -> tuple[str, str]:
    """The state keys of a layer's weight and bias (the root module's are bare)."""
    prefix = f"{layer}." if layer else ""
    return f"{prefix}weight", f"{prefix}bias"


def _kfac_specs(module: nn.Module) -> dict:
    return {n: s for n, s in capture.layer_specs(module).items() if s.kind in _KFAC_KINDS}


def _select(func: str, module, params, layers) -> tuple[list[str], tuple[str, ...]]:
    """Return (layers in module order, param names in dict order); validate their match.

    Layers: ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv2d`` (ungrouped), the root
    module included (see :mod:`dattri_fn.transforms.capture`).
    """
    specs = _kfac_specs(module)
    if layers is None:
        owned = set(params)
        lin = [n for n, sp in specs.items() if sp.weight in owned or sp.bias in owned]
    else:
        lin = layer_names(func, "layers", dict(module.named_modules()), layers, list(specs),
                          "nn.Linear, Conv1D or Conv2d", "K-FAC layers")
    owner = {}
    for name in lin:
        owner[specs[name].weight] = name
        owner[_keys(name)[1]] = name
    stray = [k for k in params if k not in owner]
    if stray:
        raise ValueError(_msg(func, "params", "only weights/biases of the selected nn.Linear, "
                              f"Conv1D or Conv2d layers {lin}", f"other keys {stray}",
                              "K-FAC covers those layers only: drop these keys from params "
                              "or select their layers."))
    no_weight = [n for n in lin if specs[n].weight not in params]
    if no_weight:
        raise ValueError(_msg(func, "params", "the weight of every selected layer",
                              f"no weight for {no_weight}",
                              "Add '<layer>.weight' to params or deselect the layer."))
    return lin, tuple(params)


def _check_call(func, module, loss_fn, params, data, layers, chunk_size, tapped=None):
    if not isinstance(module, nn.Module):
        raise TypeError(_msg(func, "module", "an nn.Module", type(module).__name__))
    if not callable(loss_fn):
        raise TypeError(_msg(func, "loss_fn", "a callable loss_fn(output, target)",
                             type(loss_fn).__name__))
    chunk_size = check_optional_int(func, "chunk_size", chunk_size)
    state = module_state(func, module, params)
    names, param_names = _select(func, module, params, layers)
    batches = iter_batches(func, "data", data)
    if tapped is None:
        tapped = capture.tap(module, names)
    elif getattr(tapped, "module", None) is not module or list(tapped.layers) != list(names):
        got = ("a tap of another module" if getattr(tapped, "module", None) is not module
               else f"a tap of layers {list(tapped.layers)}")
        raise ValueError(_msg(func, "tapped", f"tap_layers(module, {names}) of this module",
                              got, "Pass the tapped function from a call on the same module "
                              "and layers, or None."))
    return state, names, param_names, batches, tapped, chunk_size


def kfac_tap(module: nn.Module, params, *, layers: str | Iterable[str] | None = None):
    """Return the tapped forward that :func:`kfac_factors` traces for ``params`` / ``layers``.

    Pass it as ``tapped=`` to repeated :func:`kfac_factors` / :func:`ekfac_factors` calls on
    the same module (see :func:`dattri_fn.transforms.capture.tap`).
    """
    func = "kfac_tap"
    if not isinstance(module, nn.Module):
        raise TypeError(_msg(func, "module", "an nn.Module", type(module).__name__))
    return capture.tap(module, _select(func, module, check_params(func, "params", params),
                                      layers)[0])


class _SampledLoss:
    """``loss_fn`` on targets drawn by ``sampler`` from the batch's own output (true Fisher).

    The draw happens on the whole batch in ``per_example``, outside any torch.func transform
    (:func:`dattri_fn.transforms.layers.per_example_losses` calls it instead of vmapping the loss).
    """

    def __init__(self, loss_fn: Callable, sampler: Callable, seed: int):
        self.loss_fn, self.sampler = loss_fn, sampler
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, output, target):
        return self.loss_fn(output, target)

    def per_example(self, output, target) -> Tensor:
        from ..transforms.layers import per_example_losses

        detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, output)
        drawn = self.sampler(detached, target, self.generator)
        return per_example_losses(self.loss_fn, output, drawn)


def fisher_losses(func: str, loss_fn: Callable, fisher: str, seed: int,
                  sampler: Callable | None) -> Callable[[], Callable]:
    """Return ``() -> loss`` for one pass: ``loss_fn`` itself (empirical Fisher) or a
    :class:`_SampledLoss` whose generator restarts at ``seed`` (true Fisher)."""
    from ..losses import sample_categorical

    if fisher not in ("empirical", "true"):
        raise ValueError(_msg(func, "fisher", "'empirical' or 'true'", repr(fisher)))
    check_int(func, "seed", seed, minimum=0)
    if sampler is not None and not callable(sampler):
        raise TypeError(_msg(func, "sampler", "None or a callable (output, target, generator) "
                             "-> target", type(sampler).__name__))
    if fisher == "empirical":
        return lambda: loss_fn
    draw = sampler or getattr(loss_fn, "sample", None) or sample_categorical
    return lambda: _SampledLoss(loss_fn, draw, seed)


def _tokens(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """Flatten per-example token dims: ``a -> [B, T, in(+1)]``, ``g -> [B, T, out]``."""
    B = a.shape[0]
    a = a.reshape(B, -1, a.shape[-1])
    g = g.reshape(B, -1, g.shape[-1])
    if bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a, g


def _passes(func, batches, tapped, loss_fn, state, chunk_size, step, batch_rows=None):
    """Run ``step(layer, a, g)`` on every batch; return the number of examples seen."""
    n = 0
    for batch in regroup(batches, batch_rows, func):
        n += batch_size(func, "data", batch)
        for layer, (a, g) in _layer_io(tapped, loss_fn, state, batch, chunk_size).items():
            step(layer, a, g)
    if n == 0:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    return n


def _transposed(tapped) -> tuple[str, ...]:
    return tuple(n for n, sp in tapped.specs.items() if sp.kind == "conv1d")


def _kfac_core(func, state, names, param_names, batches, tapped, loss_fn, chunk_size,
               batch_rows=None):
    bias = {n: _keys(n)[1] in param_names for n in names}
    A, G = {}, {}

    def step(layer, a, g):
        a, g = _tokens(a, g, bias[layer])
        dA = torch.einsum("bti,btj->ij", a, a / a.shape[1])
        dG = torch.einsum("bto,btp->op", g, g)
        A[layer] = dA if layer not in A else A[layer] + dA
        G[layer] = dG if layer not in G else G[layer] + dG

    n = _passes(func, batches, tapped, loss_fn, state, chunk_size, step, batch_rows)
    A = {k: A[k] / n for k in names}
    G = {k: G[k] / n for k in names}
    return KFACFactors(A, G, param_names, torch.tensor(n, dtype=torch.int64), _transposed(tapped))


def kfac_factors(module: nn.Module, loss_fn: Callable, params, data, *,
                 layers: str | Iterable[str] | None = None,
                 chunk_size: int | None = None, tapped=None,
                 batch_rows: int | None = None,
                 fisher: str = "empirical", seed: int = 0,
                 sampler: Callable | None = None) -> KFACFactors:
    """Return K-FAC factors ``A = E[(1/T) sum_t a a^T]``, ``G = E[sum_t g g^T]`` per Linear layer.

    One pass over ``data``, accumulating running sums batch by batch (activations are never
    held beyond one batch). ``a`` is augmented to ``[a, 1]`` for layers whose bias is in
    ``params``. See the module docstring for the sequence convention.

    Args:
        module: the model (its layers captured by :mod:`dattri_fn.transforms.capture`).
        loss_fn: ``loss_fn(output, target) -> Tensor[]`` on a batch of one example.
        params: ``dict[str, Tensor]``, the weights (and optionally biases) of the Linear layers
            to precondition, in the order of the raveled vectors the operator will act on.
            The module's other parameters are its own.
        data: a Batch ``(*inputs, target)`` or a re-iterable of them (list, DataLoader); other
            layouts as :func:`dattri_fn.transforms.layers.unpack_example`.
        layers: Linear, Conv1D or Conv2d layer names; ``None`` selects the layers owning
            ``params``.
        chunk_size: examples per ``vmap`` chunk; ``None`` for a whole batch.
        tapped: :func:`kfac_tap` of the selected layers, to reuse across calls; ``None``
            builds it anew.
        batch_rows: merge consecutive batches into calls of at least this many examples (one
            batched forward/backward has a fixed cost of ~0.3 ms on one CPU thread); ``None``
            takes the batches as given.
        fisher: ``"empirical"`` (``g`` of the data's targets) or ``"true"`` (``g`` of targets
            drawn from the model's predictive distribution, one draw per example and pass,
            kronfluence's default).
        seed: the true Fisher's draws: a ``torch.Generator`` seeded with it starts every pass,
            so equal data give equal draws.
        sampler: ``sample(output, target, generator) -> target'`` on a batch (see
            :mod:`dattri_fn.losses`); None = ``loss_fn.sample`` if the loss has one, else
            :func:`~dattri_fn.losses.sample_categorical` (logits ``[B, K]``).

    Returns:
        :class:`KFACFactors`.

    Raises:
        TypeError, ValueError: bad module, loss_fn, layer names, data or chunk_size; params
            with keys that are not module parameters, or not weights/biases of the selected
            layers (the keys are named).

    References:
        Martens & Grosse 2015, arXiv:1503.05671; Grosse et al. 2023, arXiv:2308.03296.
    """
    func = "kfac_factors"
    state, names, pnames, batches, tapped, chunk_size = _check_call(
        func, module, loss_fn, params, data, layers, chunk_size, tapped)
    check_optional_int(func, "batch_rows", batch_rows)
    losses = fisher_losses(func, loss_fn, fisher, seed, sampler)
    return _kfac_core(func, state, names, pnames, batches, tapped, losses(), chunk_size,
                      batch_rows)


def ekfac_factors(module: nn.Module, loss_fn: Callable, params, data, *,
                  layers: str | Iterable[str] | None = None,
                  chunk_size: int | None = None, tapped=None,
                  batch_rows: int | None = None,
                  fisher: str = "empirical", seed: int = 0,
                  sampler: Callable | None = None) -> EKFACFactors:
    """Return EK-FAC bases ``Q_A, Q_G`` and ``Lambda = E[(Q_G^T DW_n Q_A)^2]`` per Linear layer.

    Two passes over ``data``: the K-FAC factors (then ``eigh``), and the corrected eigenvalues
    from the per-example gradient blocks ``DW_n = sum_t g_nt a_nt^T`` rotated into the
    eigenbasis, accumulated as running sums. ``Lambda`` is the diagonal of the empirical
    Fisher in the Kronecker eigenbasis, the Frobenius-closest such approximation.

    Args:
        module, loss_fn, params, data, layers, chunk_size, tapped, batch_rows, fisher, seed,
            sampler: as :func:`kfac_factors`.

    Returns:
        :class:`EKFACFactors`.

    Raises:
        TypeError, ValueError: as :func:`kfac_factors`.

    References:
        George et al. 2018, arXiv:1806.03884; Grosse et al. 2023, arXiv:2308.03296.
    """
    func = "ekfac_factors"
    state, names, pnames, batches, tapped, chunk_size = _check_call(
        func, module, loss_fn, params, data, layers, chunk_size, tapped)
    check_optional_int(func, "batch_rows", batch_rows)
    losses = fisher_losses(func, loss_fn, fisher, seed, sampler)
    kf = _kfac_core(func, state, names, pnames, batches, tapped, losses(), chunk_size,
                    batch_rows)
    QA = {k: torch.linalg.eigh(v)[1] for k, v in kf.A.items()}
    QG = {k: torch.linalg.eigh(v)[1] for k, v in kf.G.items()}
    bias = {n: _keys(n)[1] in pnames for n in names}
    L = {}

    def step(layer, a, g):
        a, g = _tokens(a, g, bias[layer])
        ga, aa = g @ QG[layer], a @ QA[layer]
        if a.shape[1] == 1:
            # One position: (Q_G^T DW Q_A)^2 = (g~ a~^T)^2 = g~^2 (a~^2)^T, summed over the
            # batch by one [out, B] x [B, in] product, never the [B, out, in] blocks.
            dL = ga[:, 0].square().T @ aa[:, 0].square()
        else:
            rot = torch.einsum("bto,bti->boi", ga, aa)
            dL = (rot * rot).sum(0)
        L[layer] = dL if layer not in L else L[layer] + dL

    n = _passes(func, batches, tapped, losses(), state, chunk_size, step, batch_rows)
    Lambda = {k: L[k] / n for k in names}
    return EKFACFactors(QA, QG, Lambda, pnames, torch.tensor(n, dtype=torch.int64), kf.transposed)


def _layout(func: str, param_names: tuple[str, ...], shapes: dict[str, tuple[int, int]]):
    """Return (P, {layer: (w_slice, b_slice | None)}) locating each layer in the raveled vector."""
    sizes = {}
    for layer, (out, inp) in shapes.items():
        wk, bk = _keys(layer)
        sizes[wk] = out * inp
        sizes[bk] = out
    unknown = [k for k in param_names if k not in sizes]
    if unknown:
        raise ValueError(_msg(func, "factors", "param_names of the factored layers",
                              f"unmatched {unknown}"))
    offsets, start = {}, 0
    for k in param_names:
        offsets[k] = slice(start, start + sizes[k])
        start += sizes[k]
    return start, {layer: (offsets[_keys(layer)[0]], offsets.get(_keys(layer)[1]))
                   for layer in shapes}


def _eigen_apply(name: str, QA, QG, scale, param_names, transposed=()) -> LinOp:
    """Return ``V -> blockdiag_l Q_G ((Q_G^T M_l Q_A) * scale_l) Q_A^T``.  # [k, P] -> [k, P]"""
    layers = list(QA)
    shapes = {}
    for layer in layers:
        bias = _keys(layer)[1] in param_names
        shapes[layer] = (QG[layer].shape[0], QA[layer].shape[0] - int(bias))
    P, where = _layout(name, param_names, shapes)
    ref = QA[layers[0]]
    order = {k: i for i, k in enumerate(param_names)}

    def matmat(V: Tensor) -> Tensor:
        k = V.shape[0]
        pieces = {}
        for layer in layers:
            out, inp = shapes[layer]
            ws, bs = where[layer]
            wk, bk = _keys(layer)
            flip = layer in transposed
            M = (V[:, ws].reshape(k, inp, out).transpose(1, 2) if flip
                 else V[:, ws].reshape(k, out, inp))
            if bs is not None:
                M = torch.cat([M, V[:, bs].reshape(k, out, 1)], dim=-1)
            R = QG[layer].T @ M @ QA[layer]
            X = QG[layer] @ (R * scale[layer]) @ QA[layer].T
            W = X[..., :inp]
            pieces[wk] = (W.transpose(1, 2) if flip else W).reshape(k, -1)
            if bs is not None:
                pieces[bk] = X[..., inp]
        return torch.cat([pieces[n] for n in sorted(pieces, key=order.__getitem__)], dim=1)

    return LinOp(matmat, P, ref.dtype, ref.device, name=name)


def _eigen_inverse(name: str, QA, QG, Lambda, param_names, damping, transposed=()) -> LinOp:
    """Return ``V -> blockdiag_l Q_G ((Q_G^T M_l Q_A) / (Lambda_l + damping)) Q_A^T``."""
    inv = {layer: 1.0 / (Lambda[layer] + damping) for layer in QA}
    return _eigen_apply(name, QA, QG, inv, param_names, transposed)


def _kfac_eigen(factors: KFACFactors):
    """``Q_A, Q_G`` and ``Lambda = s_G s_A^T`` of each layer's K-FAC factors."""
    QA, QG, Lam = {}, {}, {}
    for layer in factors.A:
        sA, QA[layer] = torch.linalg.eigh(factors.A[layer])
        sG, QG[layer] = torch.linalg.eigh(factors.G[layer])
        # eigh of a PSD factor can return -1e-17; clamping keeps Lambda + damping > 0.
        Lam[layer] = torch.outer(sG.clamp_min(0), sA.clamp_min(0))
    return QA, QG, Lam


def kfac_operator(factors: KFACFactors | EKFACFactors) -> LinOp:
    """Return the factored Fisher ``V -> F V`` itself, with its closed-form inverse.  # [k, P] -> [k, P]

    K-FAC: ``F = blockdiag_l A_l (x) G_l``; EK-FAC: ``(Q_A (x) Q_G) diag(Lambda)
    (Q_A (x) Q_G)^T``; each layer's ``[out, in(+1)]`` block read from and written to the
    params' ravel layout. ``op.inverse(damping)`` is :func:`ihvp_kfac` / :func:`ihvp_ekfac`, so
    ``ihvp_explicit(op, damping=...)`` and ``solvers.explicit()`` invert it in closed form, and
    ``op + damping`` composes with any other solver (CG on a K-FAC curvature).

    Raises:
        TypeError, ValueError: factors that are neither, or not finite.
    """
    func = "kfac_operator"
    if isinstance(factors, EKFACFactors):
        _check_factors(func, factors, EKFACFactors, "ekfac_factors", ("QA", "QG", "Lambda"))
        QA, QG, Lam = factors.QA, factors.QG, factors.Lambda
        inverse = lambda damping: ihvp_ekfac(factors, damping=damping)
    else:
        _check_factors(func, factors, KFACFactors, "kfac_factors or ekfac_factors", ("A", "G"))
        QA, QG, Lam = _kfac_eigen(factors)
        inverse = lambda damping: _eigen_inverse(
            "ihvp_kfac", QA, QG, Lam, factors.param_names,
            check_positive("ihvp_kfac", "damping", damping), factors.transposed)
    op = _eigen_apply(func, QA, QG, Lam, factors.param_names, factors.transposed)
    op.inverse = inverse
    return op


def _check_factors(func: str, factors, kind, maker, fields):
    if not isinstance(factors, kind):
        raise TypeError(_msg(func, "factors", f"a {kind.__name__} (from {maker})",
                             type(factors).__name__))
    for field in fields:
        d = getattr(factors, field)
        if not isinstance(d, dict) or not d:
            raise TypeError(_msg(func, f"factors.{field}", "a non-empty dict[str, Tensor]",
                                 type(d).__name__))
        for layer, t in d.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(_msg(func, f"factors.{field}", "floating-point tensors",
                                     f"{type(t).__name__} at {layer!r}"))
            if not all_finite(t):
                raise ValueError(_msg(func, f"factors.{field}", "finite values",
                                      f"NaN or inf at {layer!r}"))


def ihvp_kfac(factors: KFACFactors, *, damping: float) -> LinOp:
    """Return ``V -> (A (x) G + damping*I)^-1 V``, block-diagonal over layers.  # [k, P] -> [k, P]

    Exact inverse of the damped Kronecker product, through the eigendecompositions
    ``A = Q_A diag(s_A) Q_A^T``, ``G = Q_G diag(s_G) Q_G^T`` computed once here:
    ``M -> Q_G ((Q_G^T M Q_A) / (s_G s_A^T + damping)) Q_A^T`` for each layer's ``[out, in(+1)]``
    block ``M``, read from and written to the params' ravel layout.

    Args:
        factors: from :func:`kfac_factors`.
        damping: ``> 0``, added to the Kronecker product (not split between the factors).

    Returns:
        a :class:`~dattri_fn._types.LinOp` of dim ``P`` (the selected params).

    Raises:
        TypeError, ValueError: bad factors, non-positive damping.

    References:
        Martens & Grosse 2015, arXiv:1503.05671.
    """
    func = "ihvp_kfac"
    _check_factors(func, factors, KFACFactors, "kfac_factors", ("A", "G"))
    damping = check_positive(func, "damping", damping)
    QA, QG, Lam = _kfac_eigen(factors)
    return _eigen_inverse(func, QA, QG, Lam, factors.param_names, damping, factors.transposed)


def ihvp_ekfac(factors: EKFACFactors, *, damping: float) -> LinOp:
    """Return ``V -> Q_G ((Q_G^T V Q_A) / (Lambda + damping)) Q_A^T`` per layer.  # [k, P] -> [k, P]

    The inverse of the EK-FAC Fisher ``(Q_A (x) Q_G) diag(Lambda) (Q_A (x) Q_G)^T + damping*I``,
    block-diagonal over layers, in the params' ravel layout.

    Args:
        factors: from :func:`ekfac_factors`.
        damping: ``> 0``.

    Returns:
        a :class:`~dattri_fn._types.LinOp` of dim ``P`` (the selected params).

    Raises:
        TypeError, ValueError: bad factors, non-positive damping.

    References:
        George et al. 2018, arXiv:1806.03884; Grosse et al. 2023, arXiv:2308.03296.
    """
    func = "ihvp_ekfac"
    _check_factors(func, factors, EKFACFactors, "ekfac_factors",
                   ("QA", "QG", "Lambda"))
    damping = check_positive(func, "damping", damping)
    return _eigen_inverse(func, factors.QA, factors.QG, factors.Lambda, factors.param_names,
                          damping, factors.transposed)
