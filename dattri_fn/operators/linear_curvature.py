"""Curvature of a model whose parameters are all ``nn.Linear`` weights/biases, from layer factors.

:func:`linear_hessian` (the exact dense Hessian) and :func:`linear_gnvp` (the Gauss-Newton
operator) give the same matrices as ``hvp(...).dense()`` and ``gnvp(...)`` from per-layer
quantities of the batched forward, instead of autodiff through every parameter per column.

Exact Hessian.

For one example, let layer ``l`` map its input ``a_l`` (augmented to ``[a_l, 1]`` when its bias
is a parameter; ``k_l`` entries) to ``z_l = W_l a_l + b_l + e_l``, with a zero probe ``e_l``
(``d_l`` entries, see :func:`dattri_fn.transforms.layers.tap_layers`). Write ``g = dloss/de``,
``Ht = d^2 loss / de^2`` (``[D, D]``, ``D = sum_l d_l``: the Hessian w.r.t. all layer outputs,
activations' curvature included) and ``T_ml = d a_m / d e_l`` (``[k_m, d_l]``, zero unless
layer ``l`` feeds layer ``m``). A change ``dW`` moves the probes by ``e_m = dW_m a_m(e)``, so
to second order

    H[(l,j,k), (m,p,q)] = Ht[(l,j), (m,p)] a_l[k] a_m[q]
                        + g_m[p] T_ml[q, j] a_l[k] + g_l[j] T_lm[k, p] a_m[q]

summed over examples. ``Ht`` and ``T`` come from ``D`` forward-mode products of the batched
gradient w.r.t. the probes (one tangent per output unit, shared by the whole batch: the
examples do not interact), so the cost is ``D`` Hessian-vector products plus
``2 N P_l P_m`` flops of matrix products per layer pair, against ``P`` Hessian-vector products
for ``torch.func.hessian`` or a dense ``hvp``. On the digits MLP (``P = 2,410``, ``D = 42``)
that is ~15x fewer flops.

Gauss-Newton. With ``J = d out / de`` (``[C, D]`` per example) and ``A`` the Hessian of the loss
w.r.t. the output (``[C, C]``), ``G V`` for the rows of ``V`` (``V_l`` of layer ``l`` reshaped
to ``[d_l, in_l]``, plus its bias ``v_l``) is

    u_l = V_l a_l + v_l,   w = J^T A J u,   (G V)_l = sum_i w_l a_l^T,   (G v)_l = sum_i w_l,

two matrix products per layer and three ``[C, D]``-sized ones per example and row, against a
forward and backward pass per row for :func:`~dattri_fn.operators.curvature.gnvp`.

Limits: those of the capture engine (:mod:`dattri_fn.transforms.capture`: each Linear weight
consumed by ``F.linear`` once per forward, on a batch-first input), one row per example at
every layer (``[B, in]``, no sequence dimension), every parameter a weight or bias of a
captured Linear, no parameter shared with another module or read outside its layer (tied
weights), no hooks on the captured layers, and a module that treats the examples of a batch
independently (only Linear, activation and container modules may be in training mode). A
model outside them raises :class:`FactoredCurvatureError`. What the capture cannot see
(``torch.no_grad`` inside ``forward``, say) is caught by a check of the factored product
against autodiff through the module itself (one Hessian-vector product on the first batch, one
Gauss-Newton-vector product on its first 64 examples; once per tap and input layout), which
raises the same error.

The code lives in four modules, re-exported here: :mod:`.linear_limits` (the limits, the capture
and the first-batch check), :mod:`.linear_blocks` (dense assembly per layer pair),
:mod:`.linear_exact` (:func:`linear_hessian`) and :mod:`.linear_gauss_newton` (:func:`linear_gnvp`).
"""

from __future__ import annotations

# Private helpers too, so that old import paths keep working.
from .linear_blocks import (  # noqa: F401
    _BLOCK,
    _accumulate,
    _activation_block,
    _add,
    _feeds,
    _pair_block,
)
from .linear_exact import (  # noqa: F401
    _hessian_terms,
    _probe_terms,
    linear_hessian,
)
from .linear_gauss_newton import (  # noqa: F401
    _ROW_BLOCK,
    FactoredOperator,
    _gn_terms,
    _keep,
    linear_gnvp,
)
from .linear_limits import (  # noqa: F401
    _CHECK_ROWS,
    _MODE_FREE,
    FactoredCurvatureError,
    _augment,
    _autodiff,
    _check_close,
    _check_structure,
    _checked,
    _chunks,
    _first_pass,
    _flat_shapes,
    _probe_vector,
    _refuse,
    _setup,
    _unwrapped,
    _verified,
    linear_tap,
)

__all__ = ["FactoredCurvatureError", "linear_gnvp", "linear_hessian", "linear_tap"]
