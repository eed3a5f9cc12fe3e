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

Which Fisher (``fisher=``): ``g`` of the observed targets (empirical), of one target drawn per
example from the model (true, kronfluence's default), or the exact expectation over the model's
outputs (expected: ``sum_k g_k g_k^T`` over the columns ``b_k`` of ``H = B B^T``, the output
Hessian, so ``G`` and ``Lambda`` are built from ``E[J^T H J]``, the Gauss-Newton's layer block;
for a one-layer model K-FAC is then the layer's exact Gauss-Newton when ``a`` is constant per
example, and EK-FAC is exact when the Gauss-Newton is diagonal in the Kronecker eigenbasis).

The inverse is block-diagonal over layers; per layer (``M`` the layer's slice of a row of ``V``
reshaped to ``[out, in(+1)]``):

    M -> Q_G ((Q_G^T M Q_A) / (Lambda + damping)) Q_A^T,

with ``Lambda = s_G s_A^T`` (outer product of eigenvalues) for K-FAC, which makes it the exact
inverse of ``A (x) G + damping * I``. The raveled layout follows the params dict: the weight's
``out * in`` entries (row-major) and the bias's ``out`` entries sit wherever ``ravel`` puts them,
never as one concatenated ``[out, in + 1]`` block.

Scoring layer by layer: with ``M_j`` a test row's layer block after the inverse
(``op.blocks(op(G_test))``), a training example's influence is ``sum_l sum_t g_t^T M_jl a_t``
(:func:`layer_scores`; self-influence :func:`layer_self_scores`), so a training batch never
becomes ``[B, P]`` rows. The factor passes take each layer's statistic as its ``g`` arrives in
the backward pass (one layer's gradient alive at a time). Across processes, ``reduce=`` sums
each pass's statistics before they are divided (:func:`dattri_fn.distributed.all_reduce_stats`).
A weight tied to another layer (GPT-2's ``wte`` = ``lm_head``) is refused: its gradient is a
sum over an Embedding and a Linear use, which the capture engine does not factor.

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
import torch.nn.functional as F
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
from ..transforms.layers import _stream_layer_io, layer_chunks, layer_names, module_state

__all__ = ["KFACFactors", "EKFACFactors", "BlockLinOp", "kfac_factors", "ekfac_factors",
           "kfac_tap", "ihvp_kfac", "ihvp_ekfac", "kfac_operator", "layer_scores",
           "layer_self_scores", "low_rank_blocks"]


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
_LAMBDA_ENTRIES = 2**18  # entries of one chunk of rotated gradient blocks in the Lambda pass


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
    tied = _tied_uses(module, stray)
    if tied:
        raise ValueError(_msg(func, "params", "weights used by one layer each",
                              "; ".join(f"{k!r} shared by {uses}" for k, uses in tied.items()),
                              "K-FAC/EK-FAC factor a weight from its one layer's inputs and "
                              "output gradients; a tied weight (GPT-2's wte = lm_head) has a "
                              "gradient summed over its uses, which the capture engine does "
                              "not factor: leave it out of params (e.g. params=lambda n: "
                              "'wte' not in n) or attribute it with a dense method "
                              "(grad_dot, influence with solver='cg')."))
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


def _tied_uses(module: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{key: "'name' (Kind), ..."}`` for the keys whose tensor several modules hold."""
    names: dict[int, list[str]] = {}
    for k, v in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(v), []).append(k)
    modules = dict(module.named_modules())
    alias = {k: ks for ks in names.values() if len(ks) > 1 for k in ks}
    out = {}
    for k in keys:
        if k in alias:
            owners = [a.rpartition(".")[0] for a in alias[k]]
            out[k] = ", ".join(f"{o!r} ({type(modules[o]).__name__})" for o in owners)
    return out


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


class _ExpectedLoss:
    """The expectation over the model's own output distribution (``fisher="expected"``).

    For a loss whose Hessian in the output is known, ``H_n = B_n B_n^T`` with ``B_n`` ``[C, K]``
    (:meth:`directions`), ``E_y[g g^T] = J^T H_n J = sum_k (J^T b_nk)(J^T b_nk)^T``: the
    statistics take ``K`` backprops of the detached columns ``b_nk`` per example (one forward).
    Softmax cross-entropy: ``H = diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T``, so
    ``b_c = sqrt(p_c) (e_c - p)``, ``K = C``; ``F.mse_loss`` (the mean over the ``D`` output
    entries of one example): ``H = (2 / D) I``, ``b_k = sqrt(2 / D) e_k``, ``K = D``.
    """

    def __init__(self, func: str, loss_fn: Callable, kind: str):
        self.func, self.loss_fn, self.kind = func, loss_fn, kind

    def directions(self, out) -> Tensor:
        """``B`` with ``H_n = B_n B_n^T``, detached.  # out [B, C] (or [B, ...]) -> [K, B, ...]"""
        if not isinstance(out, Tensor) or (self.kind == "ce" and out.ndim != 2):
            got = (f"output shape {list(out.shape)}" if isinstance(out, Tensor)
                   else f"a {type(out).__name__} output")
            raise ValueError(_msg(self.func, "fisher", "'expected' on [B, C] logits for "
                                  "softmax cross-entropy", got, "Use fisher='true' (one "
                                  "drawn target per example) for sequence outputs."))
        out = out.detach()
        if self.kind == "ce":
            p = out.softmax(-1)  # [B, C]
            eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
            # b[c, n, :] = sqrt(p_nc) (e_c - p_n)
            return (eye[:, None, :] - p[None]) * p.T.sqrt()[:, :, None]
        D = out[0].numel()
        eye = torch.eye(D, dtype=out.dtype, device=out.device) * (2.0 / D) ** 0.5
        return eye[:, None, :].expand(D, out.shape[0], D).reshape(D, *out.shape)


def _expected_kind(loss_fn: Callable) -> str | None:
    from ..transforms.layers import cross_entropy_rows

    if loss_fn is F.cross_entropy or getattr(loss_fn, "per_example", None) is cross_entropy_rows:
        return "ce"
    return "mse" if loss_fn is F.mse_loss else None


def _expected_io(tapped, expected: _ExpectedLoss, state, batch, chunk_size, step,
                 on_input=None) -> None:
    """``step(layer, a, g_k)`` for each output-Hessian direction ``k`` of :class:`_ExpectedLoss`,
    from one batched forward and ``K`` backward passes through its graph."""
    for args, kwargs, _, shapes, like in layer_chunks(tapped, state, batch, chunk_size):
        probes = {k: like.new_zeros(shapes[k], requires_grad=True) for k in tapped.layers}
        with torch.enable_grad():
            out, captured = tapped(state, probes, *args, **kwargs)
            acts = {k: a.detach() for k, a in captured.items()}
            del captured
            if on_input is not None:
                with torch.no_grad():
                    for k in list(acts):
                        on_input(k, acts.pop(k))
            B = expected.directions(out)
            for j in range(B.shape[0]):
                gs = torch.autograd.grad(out, list(probes.values()), grad_outputs=B[j],
                                         retain_graph=j + 1 < B.shape[0])
                with torch.no_grad():
                    for k, g in zip(probes, gs, strict=True):
                        step(k, acts.get(k), g)


def fisher_losses(func: str, loss_fn: Callable, fisher: str, seed: int,
                  sampler: Callable | None) -> Callable[[], Callable]:
    """Return ``() -> loss`` for one pass: ``loss_fn`` itself (empirical Fisher), a
    :class:`_SampledLoss` whose generator restarts at ``seed`` (true Fisher), or an
    :class:`_ExpectedLoss` (the exact expectation over the model's outputs)."""
    from ..losses import sample_categorical

    if fisher not in ("empirical", "true", "expected"):
        raise ValueError(_msg(func, "fisher", "'empirical', 'true' or 'expected'", repr(fisher)))
    if fisher == "expected":
        kind = _expected_kind(loss_fn)
        if kind is None:
            raise ValueError(_msg(func, "fisher", "'empirical' or 'true' for this loss_fn "
                                  "('expected' needs a known output Hessian: F.cross_entropy, "
                                  "a loss with per_example=cross_entropy_rows, or F.mse_loss)",
                                  f"'expected' with loss_fn "
                                  f"{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"))
        return lambda: _ExpectedLoss(func, loss_fn, kind)
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


def _passes(func, batches, tapped, loss_fn, state, chunk_size, step, batch_rows=None,
            on_input=None):
    """Run ``step(layer, a, g)`` on every batch; return the number of examples seen.

    Each layer's step runs as its ``g`` arrives in the backward pass
    (:func:`~dattri_fn.transforms.layers.streamed_io`), so the layers' gradients are never all
    held at once.
    """
    n = 0
    stream = _expected_io if isinstance(loss_fn, _ExpectedLoss) else _stream_layer_io
    for batch in regroup(batches, batch_rows, func):
        n += batch_size(func, "data", batch)
        stream(tapped, loss_fn, state, batch, chunk_size, step, on_input)
    if n == 0:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    return n


def _transposed(tapped) -> tuple[str, ...]:
    return tuple(n for n, sp in tapped.specs.items() if sp.kind == "conv1d")


def _reduced(func: str, reduce, sums: dict[str, Tensor], n: int) -> tuple[dict[str, Tensor], int]:
    """``reduce(sums, n)``: this process's sums and count in, every process's out (checked)."""
    if reduce is None:
        return sums, n
    out = reduce(dict(sums), n)
    ok = (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict)
          and set(out[0]) == set(sums) and isinstance(out[1], int) and out[1] >= n)
    if not ok:
        raise TypeError(_msg(func, "reduce", "a callable (sums, count) -> (sums with the same "
                             "keys, total count >= count)", f"{type(out).__name__} {out!r}"[:200]))
    return out


def _check_reduce(func: str, reduce) -> None:
    if reduce is not None and not callable(reduce):
        raise TypeError(_msg(func, "reduce", "None or a callable (sums, count) -> (sums, count)",
                             type(reduce).__name__))


def _check_dtype(func: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(_msg(func, "dtype", "None or a floating torch.dtype (torch.bfloat16, ...)",
                             repr(dtype)))


def _kfac_core(func, state, names, param_names, batches, tapped, loss_fn, chunk_size,
               batch_rows=None, reduce=None):
    bias = {n: _keys(n)[1] in param_names for n in names}
    A, G = {}, {}

    # A is taken from each layer's input right after the forward, G as each g arrives in the
    # backward: no layer input is held through the backward pass.
    def on_input(layer, a):
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        if bias[layer]:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        a2 = a.reshape(-1, a.shape[-1])
        dA = (a2.T @ a2).div_(a.shape[1])  # scaled after the product: no [B, T, in] copy
        if layer in A:
            A[layer] += dA
        else:
            A[layer] = dA

    def step(layer, _, g):
        g2 = g.reshape(-1, g.shape[-1])
        dG = g2.T @ g2
        if layer in G:
            G[layer] += dG
        else:
            G[layer] = dG

    n = _passes(func, batches, tapped, loss_fn, state, chunk_size, step, batch_rows, on_input)
    sums, n = _reduced(func, reduce, {**{f"A:{k}": A[k] for k in names},
                                      **{f"G:{k}": G[k] for k in names}}, n)
    A = {k: sums[f"A:{k}"] / n for k in names}
    G = {k: sums[f"G:{k}"] / n for k in names}
    return KFACFactors(A, G, param_names, torch.tensor(n, dtype=torch.int64), _transposed(tapped))


def kfac_factors(module: nn.Module, loss_fn: Callable, params, data, *,
                 layers: str | Iterable[str] | None = None,
                 chunk_size: int | None = None, tapped=None,
                 batch_rows: int | None = None,
                 fisher: str = "empirical", seed: int = 0,
                 sampler: Callable | None = None, reduce: Callable | None = None,
                 dtype: torch.dtype | None = None) -> KFACFactors:
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
        fisher: ``"empirical"`` (``g`` of the data's targets), ``"true"`` (``g`` of targets
            drawn from the model's predictive distribution, one draw per example and pass,
            kronfluence's default) or ``"expected"`` (the exact expectation over that
            distribution: ``G = E[J^T H J]`` with ``H`` the loss's Hessian in the output, the
            layer blocks of the Gauss-Newton; ``K`` backprops per example of the columns of
            ``H = B B^T``, ``A`` counted once): softmax cross-entropy on ``[B, C]`` logits
            (``H = diag(p) - p p^T``, ``K = C``) or ``F.mse_loss`` (``H = (2/D) I``, ``K = D``
            output entries); other losses are refused.
        seed: the true Fisher's draws: a ``torch.Generator`` seeded with it starts every pass,
            so equal data give equal draws.
        sampler: ``sample(output, target, generator) -> target'`` on a batch (see
            :mod:`dattri_fn.losses`); None = ``loss_fn.sample`` if the loss has one, else
            :func:`~dattri_fn.losses.sample_categorical` (logits ``[B, K]``).
        reduce: ``reduce(sums, count) -> (sums, count)``, called once per pass with this
            process's statistic sums over its examples (a dict of tensors, keys opaque) and its
            example count; returns the sums and count over every process (an all-reduce:
            :func:`dattri_fn.distributed.all_reduce_stats`). None: this process's data is all.
        dtype: store the factors in this dtype (e.g. ``torch.bfloat16``: half the memory, the
            statistics still accumulated in the model's dtype); the inverses compute in their
            operand's dtype. None: the model's dtype.

    Returns:
        :class:`KFACFactors`.

    Raises:
        TypeError, ValueError: bad module, loss_fn, layer names, data or chunk_size; params
            with keys that are not module parameters, or not weights/biases of the selected
            layers (the keys are named).

    References:
        Martens & Grosse 2015, arXiv:1503.05671; Grosse et al. 2023, arXiv:2308.03296.
    """
    kf, _ = _checked_kfac_pass("kfac_factors", module, loss_fn, params, data, layers, chunk_size,
                               tapped, batch_rows, fisher, seed, sampler, reduce, dtype)
    if dtype is None:
        return kf
    return kf._replace(A={k: v.to(dtype) for k, v in kf.A.items()},
                       G={k: v.to(dtype) for k, v in kf.G.items()})


def _checked_kfac_pass(func, module, loss_fn, params, data, layers, chunk_size, tapped,
                       batch_rows, fisher, seed, sampler, reduce, dtype):
    """Validate the factor builders' arguments and run the K-FAC pass: ``(KFACFactors, (state,
    names, pnames, batches, tapped, chunk_size, losses))``, the latter for a second pass."""
    state, names, pnames, batches, tapped, chunk_size = _check_call(
        func, module, loss_fn, params, data, layers, chunk_size, tapped)
    check_optional_int(func, "batch_rows", batch_rows)
    _check_reduce(func, reduce)
    _check_dtype(func, dtype)
    losses = fisher_losses(func, loss_fn, fisher, seed, sampler)
    kf = _kfac_core(func, state, names, pnames, batches, tapped, losses(), chunk_size,
                    batch_rows, reduce)
    return kf, (state, names, pnames, batches, tapped, chunk_size, losses)


def ekfac_factors(module: nn.Module, loss_fn: Callable, params, data, *,
                  layers: str | Iterable[str] | None = None,
                  chunk_size: int | None = None, tapped=None,
                  batch_rows: int | None = None,
                  fisher: str = "empirical", seed: int = 0,
                  sampler: Callable | None = None, reduce: Callable | None = None,
                  dtype: torch.dtype | None = None) -> EKFACFactors:
    """Return EK-FAC bases ``Q_A, Q_G`` and ``Lambda = E[(Q_G^T DW_n Q_A)^2]`` per Linear layer.

    Two passes over ``data``: the K-FAC factors (then ``eigh``), and the corrected eigenvalues
    from the per-example gradient blocks ``DW_n = sum_t g_nt a_nt^T`` rotated into the
    eigenbasis, accumulated as running sums. ``Lambda`` is the diagonal of the empirical
    Fisher in the Kronecker eigenbasis, the Frobenius-closest such approximation.

    Args:
        module, loss_fn, params, data, layers, chunk_size, tapped, batch_rows, fisher, seed,
            sampler, dtype: as :func:`kfac_factors`.
        reduce: as :func:`kfac_factors`, called twice: after the K-FAC pass (so every process
            takes the eigenbases of the same global factors) and after the ``Lambda`` pass.

    Returns:
        :class:`EKFACFactors`.

    Raises:
        TypeError, ValueError: as :func:`kfac_factors`.

    References:
        George et al. 2018, arXiv:1806.03884; Grosse et al. 2023, arXiv:2308.03296.
    """
    func = "ekfac_factors"
    kf, (state, names, pnames, batches, tapped, chunk_size, losses) = _checked_kfac_pass(
        func, module, loss_fn, params, data, layers, chunk_size, tapped, batch_rows, fisher,
        seed, sampler, reduce, dtype)
    QA = {k: torch.linalg.eigh(v)[1] for k, v in kf.A.items()}
    QG = {k: torch.linalg.eigh(v)[1] for k, v in kf.G.items()}
    bias = {n: _keys(n)[1] in pnames for n in names}
    L = {}

    def step(layer, a, g):
        a, g = _tokens(a, g, bias[layer])
        qa, qg = QA[layer], QG[layer]
        if a.shape[1] == 1:
            # One position: (Q_G^T DW Q_A)^2 = (g~ a~^T)^2 = g~^2 (a~^2)^T, summed over the
            # batch by one [out, B] x [B, in] product, never the [B, out, in] blocks.
            dL = (g[:, 0] @ qg).square_().T @ (a[:, 0] @ qa).square_()
        else:
            # (Q_G^T DW_n Q_A)^2 = ((g Q_G)^T (a Q_A))^2 summed over examples, a chunk of rows
            # at a time: rotated tokens and [rows, out, in] blocks stay ~1 MiB (this runs inside
            # the backward pass, beside the model's saved activations).
            o, i = g.shape[-1], a.shape[-1]
            step_rows = max(1, _LAMBDA_ENTRIES // (o * max(i, a.shape[1])))
            dL = g.new_zeros(o, i)
            for r in range(0, g.shape[0], step_rows):
                rot = (g[r:r + step_rows] @ qg).mT @ (a[r:r + step_rows] @ qa)
                dL += rot.square_().sum(0)
        L[layer] = dL if layer not in L else L[layer] + dL

    n = _passes(func, batches, tapped, losses(), state, chunk_size, step, batch_rows)
    sums, n = _reduced(func, reduce, {f"L:{k}": L[k] for k in names}, n)
    Lambda = {k: sums[f"L:{k}"] / n for k in names}
    if dtype is not None:
        QA, QG, Lambda = ({k: v.to(dtype) for k, v in d.items()} for d in (QA, QG, Lambda))
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


class BlockLinOp(LinOp):
    """A K-FAC/EK-FAC operator, block-diagonal over layers, that also reads rows layer by layer.

    ``blocks(V)``: each layer's ``[k, out, in(+1)]`` block of rows ``V`` (weights as ``[out,
    in]`` also for Conv1D, the bias as the last column); ``eigen``: ``(Q_A, Q_G, scale)`` per
    layer for an inverse (``scale = 1 / (Lambda + damping)``), else None.
    """

    __slots__ = ("blocks", "eigen")
    follows_dtype = True  # products are taken in the rows' dtype (factors may be 16-bit)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks, self.eigen = None, None


def _shapes(QA, QG, param_names) -> dict[str, tuple[int, int]]:
    """``{layer: (out, in)}`` (``in`` without the bias column) from the factors' sizes."""
    return {layer: (QG[layer].shape[0], QA[layer].shape[0] - int(_keys(layer)[1] in param_names))
            for layer in QA}


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype products with a factor are taken in: its own, float32 for 16-bit storage."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _read_blocks(V: Tensor, layers, shapes, where, transposed) -> dict[str, Tensor]:
    """Each layer's ``[k, out, in(+1)]`` block of the rows of ``V`` (bias as the last column)."""
    k = V.shape[0]
    out_blocks = {}
    for layer in layers:
        out, inp = shapes[layer]
        ws, bs = where[layer]
        M = (V[:, ws].reshape(k, inp, out).transpose(1, 2) if layer in transposed
             else V[:, ws].reshape(k, out, inp))
        if bs is not None:
            M = torch.cat([M, V[:, bs].reshape(k, out, 1)], dim=-1)
        out_blocks[layer] = M
    return out_blocks


def _eigen_apply(name: str, QA, QG, scale, param_names, transposed=()) -> LinOp:
    """Return ``V -> blockdiag_l Q_G ((Q_G^T M_l Q_A) * scale_l) Q_A^T``.  # [k, P] -> [k, P]

    Factors stored in a 16-bit dtype are cast to the operand's dtype at each product.
    """
    layers = list(QA)
    shapes = _shapes(QA, QG, param_names)
    P, where = _layout(name, param_names, shapes)
    ref = QA[layers[0]]
    order = {k: i for i, k in enumerate(param_names)}

    def matmat(V: Tensor) -> Tensor:
        pieces = {}
        blocks = _read_blocks(V, layers, shapes, where, transposed)
        for layer in layers:
            inp = shapes[layer][1]
            wk, bk = _keys(layer)
            qa, qg = QA[layer].to(V.dtype), QG[layer].to(V.dtype)
            R = qg.T @ blocks[layer] @ qa
            X = qg @ (R * scale[layer].to(V.dtype)) @ qa.T
            W = X[..., :inp]
            pieces[wk] = (W.transpose(1, 2) if layer in transposed else W).reshape(V.shape[0], -1)
            if where[layer][1] is not None:
                pieces[bk] = X[..., inp]
        return torch.cat([pieces[n] for n in sorted(pieces, key=order.__getitem__)], dim=1)

    op = BlockLinOp(matmat, P, _compute_dtype(ref), ref.device, name=name)
    op.blocks = lambda V: _read_blocks(V, layers, shapes, where, transposed)
    return op


def _eigen_inverse(name: str, QA, QG, Lambda, param_names, damping, transposed=()) -> LinOp:
    """Return ``V -> blockdiag_l Q_G ((Q_G^T M_l Q_A) / (Lambda_l + damping)) Q_A^T``.

    The operator also carries ``.blocks(V)`` (each layer's ``[k, out, in(+1)]`` block of rows
    ``V``) and ``.eigen`` = ``(Q_A, Q_G, 1 / (Lambda + damping))`` per layer, for scoring layer by
    layer (:func:`layer_scores`, :func:`layer_self_scores`).
    """
    inv = {layer: 1.0 / (Lambda[layer].to(_compute_dtype(Lambda[layer])) + damping)
           for layer in QA}
    op = _eigen_apply(name, QA, QG, inv, param_names, transposed)
    op.eigen = (QA, QG, inv)
    return op


def _kfac_eigen(factors: KFACFactors):
    """``Q_A, Q_G`` and ``Lambda = s_G s_A^T`` of each layer's K-FAC factors (16-bit factors
    are decomposed in float32)."""
    QA, QG, Lam = {}, {}, {}
    for layer in factors.A:
        A, G = factors.A[layer], factors.G[layer]
        sA, QA[layer] = torch.linalg.eigh(A.to(_compute_dtype(A)))
        sG, QG[layer] = torch.linalg.eigh(G.to(_compute_dtype(G)))
        # eigh of a PSD factor can return -1e-17; clamping keeps Lambda + damping > 0.
        Lam[layer] = torch.outer(sG.clamp_min(0), sA.clamp_min(0))
    return QA, QG, Lam


_BLOCK_ENTRIES = 2**20  # entries of one chunk of per-example gradient blocks [b, out, in]


def _as(t: Tensor, dtype) -> Tensor:
    return t if dtype is None else t.to(dtype)


def _pair_scores(a: Tensor, g: Tensor, M: Tensor, dtype) -> Tensor:
    """``s[b, j] = sum_t g_bt^T M_j a_bt``.  # a [B, T, i], g [B, T, o], M [n, o, i] -> [B, n]"""
    B, T, i = a.shape
    n, o = M.shape[:2]
    a, g, M = _as(a, dtype), _as(g, dtype), _as(M, dtype)
    if T == 1 and n <= i:
        # (M_j a_b) . g_b: [B, n, o] products, never the [B, o, i] gradient blocks
        X = (a[:, 0] @ M.reshape(n * o, i).T).reshape(B, n, o)
        return torch.einsum("bno,bo->bn", X, g[:, 0])
    # <DW_b, M_j> with DW_b = sum_t g_bt a_bt^T: B o i (T + n) flops, the fewest for T > 1;
    # the blocks are formed a chunk of rows at a time, one layer at a time.
    Mf = M.reshape(n, o * i).T
    step = max(1, _BLOCK_ENTRIES // (o * i))
    parts = [(g[r:r + step].mT @ a[r:r + step]).reshape(-1, o * i) @ Mf for r in range(0, B, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _low_rank_pair_scores(a: Tensor, g: Tensor, L: Tensor, R: Tensor, dtype) -> Tensor:
    """``s[b, j] = sum_t (g_bt^T L_j) . (R_j a_bt)``.  # a [B, T, i], g [B, T, o], L [n, o, r],
    R [n, r, i] -> [B, n]: ``B T n r (o + i)`` flops instead of ``B o i n``."""
    B, T, i = a.shape
    n, o, r = L.shape
    a, g, L, R = _as(a, dtype), _as(g, dtype), _as(L, dtype), _as(R, dtype)
    gl = (g.reshape(B * T, o) @ L.permute(1, 0, 2).reshape(o, n * r)).reshape(B, T, n * r)
    ra = (a.reshape(B * T, i) @ R.permute(2, 0, 1).reshape(i, n * r)).reshape(B, T, n * r)
    return (gl * ra).sum(1).reshape(B, n, r).sum(-1)


def low_rank_blocks(blocks: dict[str, Tensor], rank: int) -> dict[str, Tensor | tuple]:
    """Return each ``[n, out, in(+1)]`` block as its rank-``rank`` SVD truncation ``(U_r S_r,
    V_r^T)`` (``[n, out, r]``, ``[n, r, in(+1)]``), or whole where ``min(out, in(+1)) <= rank``.

    kronfluence's low-rank query gradients (``query_gradient_low_rank``; here the exact SVD,
    not a randomised one): :func:`layer_scores` then costs ``r (out + in)`` per token and test
    row instead of ``out * in``, and the test side holds ``r (out + in)`` numbers per layer.
    """
    rank = check_int("low_rank_blocks", "rank", rank)
    out = {}
    for layer, M in blocks.items():
        if min(M.shape[-2:]) <= rank:
            out[layer] = M
            continue
        U, S, Vh = torch.linalg.svd(M.to(_compute_dtype(M)), full_matrices=False)
        out[layer] = ((U[..., :rank] * S[..., None, :rank]).to(M.dtype),
                      Vh[..., :rank, :].to(M.dtype))
    return out


def layer_scores(io: dict[str, tuple[Tensor, Tensor]], blocks: dict[str, Tensor | tuple], *,
                 dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Return ``s_l[i, j] = <DW_il, M_jl> = sum_t g_it^T M_jl a_it`` per layer.  # {layer: [B, n]}

    The per-layer scores of training gradients ``DW_i = sum_t g_it a_it^T`` (captured ``a``,
    ``g`` from :func:`dattri_fn.transforms.layers.batched_io`) against test-side blocks ``M_j``
    (e.g. ``op.blocks(ihvp(G_test))`` of an inverse from :func:`ihvp_ekfac`), summed over layers
    the influence ``g_i^T (F + damping I)^-1 g_j``. No ``[B, P]`` matrix is formed: at most one
    layer's ``[b, out, in]`` gradient blocks, ``b`` rows at a time (about 2^20 entries).

    Args:
        io: ``{layer: (a, g)}``, ``a`` ``[B, (T,) in]``, ``g`` ``[B, (T,) out]``.
        blocks: ``{layer: [n, out, in(+1)]}``; one column more than ``a`` means the layer's
            bias is scored too (``a`` is augmented with ones). A pair ``(L [n, out, r],
            R [n, r, in(+1)])`` (from :func:`low_rank_blocks`) stands for ``M_j = L_j R_j``,
            scored as ``sum_t (g_t^T L_j) . (R_j a_t)`` where that takes fewer flops than
            forming ``M_j`` (``T n r (out + in)`` against ``out in (T + n)`` per example).
        dtype: the dtype of the products (e.g. ``torch.bfloat16``); None: the blocks'. The
            scores are returned in the blocks' dtype.
    """
    out = {}
    for layer, M in blocks.items():
        a, g = io[layer]
        if isinstance(M, tuple):
            L, R = M
            a, g = _tokens(a, g, R.shape[-1] == a.shape[-1] + 1)
            (n, o, r), (T, i) = L.shape, a.shape[1:]
            # the fewer flops per training example: the factored pair, or M = L R formed once
            # (the dense path shares the per-example blocks over every test row when T > 1)
            if T * n * r * (o + i) <= o * i * (T + n if T > 1 else n):
                out[layer] = _low_rank_pair_scores(a, g, L, R, dtype).to(L.dtype)
            else:
                out[layer] = _pair_scores(a, g, L @ R, dtype).to(L.dtype)
            continue
        a, g = _tokens(a, g, M.shape[-1] == a.shape[-1] + 1)
        out[layer] = _pair_scores(a, g, M, dtype).to(M.dtype)
    return out


def layer_self_scores(op: LinOp, io: dict[str, tuple[Tensor, Tensor]], *,
                      layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Return ``<DW_il, (F_l + damping I)^-1 DW_il>`` per layer and example.  # {layer: [B]}

    In the eigenbasis: ``sum((Q_G^T DW_il Q_A)^2 / (Lambda_l + damping))``, with ``op`` an
    inverse from :func:`ihvp_kfac` / :func:`ihvp_ekfac` (its ``eigen``); ``layers``: those of
    ``io`` to score (None: every layer of ``op``).
    """
    QA, QG, scale = op.eigen
    out = {}
    for layer in (QA if layers is None else layers):
        a, g = io[layer]
        qa, qg, sc = QA[layer].to(a.dtype), QG[layer].to(a.dtype), scale[layer].to(a.dtype)
        a, g = _tokens(a, g, qa.shape[0] == a.shape[-1] + 1)
        o, i = g.shape[-1], a.shape[-1]
        step = max(1, _BLOCK_ENTRIES // (o * i))
        parts = []
        for r in range(0, a.shape[0], step):
            R = qg.T @ (g[r:r + step].mT @ a[r:r + step]) @ qa
            parts.append((R * R * sc).sum((1, 2)))
        out[layer] = torch.cat(parts)
    return out


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
