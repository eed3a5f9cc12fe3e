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

Padding: in a Mapping batch with an ``attention_mask`` (zero at pads, the Hugging Face convention)
``T`` is each example's count ``T_n`` of real positions and ``A`` sums over those only,
``A = (1/N) sum_n (1/T_n) sum_{t real} a_nt a_nt^T`` (:mod:`dattri_fn.transforms.padding`), what
the example gives unpadded; ``g`` is zero at positions the loss ignores (labels -100), so
factors and scores do not depend on right or per-batch padding. (kronfluence and dattri divide
one sum over all real tokens by their total count instead: the same when every example has as
many real tokens.)

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
A weight tied between an Embedding and a Linear (GPT-2's ``wte`` = ``lm_head``) is one pooled
layer (:mod:`.kfac_tied`): both uses are captured, their ``(out, in)`` vectors pooled as the
positions of one ``[V, d]`` Linear layer, so that EK-FAC's ``Lambda`` comes from the exact
per-example gradient (both uses summed) in the eigenbasis of the pooled factors; plain K-FAC on
them is K-FAC-expand (Eschenhagen et al. 2023, arXiv:2311.00636), an approximation.

Params outside every Kronecker layer (``functional_model``'s default params on a transformer:
LayerNorm scales and shifts, a positional ``nn.Embedding``, a bias whose weight is not
attributed, a tied weight that cannot be pooled) take a block of their own, their exact Fisher
diagonal ``D = E[g^2]`` from per-example gradients (:mod:`.kfac_diag`; EK-FAC's rule in the
identity basis), inverted elementwise as ``1 / (D + damping)`` and combined block-diagonally
with the layers' blocks, in the inverse, the operator, the layer-by-layer scores and the
self-scores; the factor builders warn once, naming each such key and why
(``others="diagonal"``: no warning; ``others="error"``: refused, as before stop 20).

References:
    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", 2015, arXiv:1503.05671.
    George et al., "Fast Approximate Natural Gradient Descent in a Kronecker-factored
    Eigenbasis", 2018, arXiv:1806.03884.
    Grosse et al., "Studying Large Language Model Generalization with Influence Functions",
    2023, arXiv:2308.03296.

Modules: :mod:`.kfac_layers` (layer selection, ``kfac_tap``), :mod:`.kfac_fisher` (the
empirical/true/expected Fisher losses), :mod:`.kfac_stats` (``KFACFactors``, ``EKFACFactors``,
``kfac_factors``, ``ekfac_factors``), :mod:`.kfac_inverse` (``BlockLinOp``, ``kfac_operator``,
``ihvp_kfac``, ``ihvp_ekfac``), :mod:`.kfac_scores` (``layer_scores``, ``layer_self_scores``,
``low_rank_blocks``), :mod:`.kfac_tied` (tied weights: ``tied_group``, ``pooled_io``,
``pooled_parts``, ``PooledParts``, ``tied_steps``) and :mod:`.kfac_diag` (the diagonal block:
``diagonal_groups``, ``diagonal_rows``, ``diagonal_sums``, ``warn_outside``); every name stays
importable from here.
"""

from __future__ import annotations

from .kfac_diag import diagonal_groups, diagonal_rows, diagonal_sums, warn_outside  # noqa: F401
from .kfac_fisher import (  # noqa: F401
    _expected_io,
    _expected_kind,
    _ExpectedLoss,
    _SampledLoss,
    fisher_losses,
)
from .kfac_inverse import (  # noqa: F401
    BlockLinOp,
    _check_factors,
    _compute_dtype,
    _eigen_apply,
    _eigen_inverse,
    _kfac_eigen,
    _layout,
    _read_blocks,
    _shapes,
    ihvp_ekfac,
    ihvp_kfac,
    kfac_operator,
)
from .kfac_layers import (  # noqa: F401
    _KFAC_KINDS,
    _capture_layers,
    _check_call,
    _keys,
    _kfac_specs,
    _select,
    _tied_uses,
    kfac_tap,
)
from .kfac_scores import (  # noqa: F401
    _BLOCK_ENTRIES,
    _as,
    _low_rank_pair_scores,
    _pair_scores,
    layer_scores,
    layer_self_scores,
    low_rank_blocks,
)
from .kfac_stats import (  # noqa: F401
    _LAMBDA_ENTRIES,
    EKFACFactors,
    KFACFactors,
    _check_dtype,
    _check_reduce,
    _checked_kfac_pass,
    _kfac_core,
    _passes,
    _reduced,
    _tokens,
    _transposed,
    ekfac_factors,
    kfac_factors,
)
from .kfac_tied import PooledParts, pooled_io, pooled_parts, tied_group, tied_steps  # noqa: F401

__all__ = ["KFACFactors", "EKFACFactors", "BlockLinOp", "kfac_factors", "ekfac_factors",
           "kfac_tap", "ihvp_kfac", "ihvp_ekfac", "kfac_operator", "layer_scores",
           "layer_self_scores", "low_rank_blocks"]
