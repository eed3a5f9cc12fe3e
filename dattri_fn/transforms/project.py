"""Random projections ``X -> X R`` that shrink ``P`` features to ``d = proj_dim``.  # [B, P] -> [B, d]

``R`` is a ``[P, d]`` random matrix with ``E[R R^T] = I_P``, so inner products are preserved in
expectation (Johnson-Lindenstrauss). Three kinds:

    gaussian    ``R_ij ~ N(0, 1) / sqrt(d)``
    rademacher  ``R_ij = +-1 / sqrt(d)`` with equal probability
    sjlt        sparse JL / count-sketch: row ``i`` of ``R`` has exactly ``nnz`` non-zeros
                ``+-1 / sqrt(nnz)``, one in each of ``nnz`` near-equal segments of ``[0, d)``
                (the Kane-Nelson block construction; ``nnz=1`` is the count-sketch). Applied by
                ``index_add_``, never as a dense matrix.

Definition of ``R`` (what the seed fixes). Rows are cut into blocks of ``block_rows`` rows,
``block_rows = clamp(2**21 // width, 1, 2**16)`` with ``width = d`` (dense kinds) or ``nnz``
(sjlt). Block ``c`` is drawn from a CPU ``torch.Generator`` seeded with
``splitmix64(splitmix64(seed) + c)``: dense kinds in float32, sjlt as segment offsets and signs.
So ``R`` depends only on ``(P, d, kind, seed, nnz)``; ``chunk_size`` only says how many rows of
``R`` are materialised at once (rounded up to whole blocks) and changes nothing but float
round-off in the accumulation (nothing at all for sjlt with ``nnz=1`` on the CPU).

Trade-off: blocks are always drawn on the CPU and copied to the features' device, so the same
seed gives the same ``R`` on every device and in every dtype (float64 features see the float32
draws exactly). On a GPU this costs CPU generation plus a host-to-device copy per block, which is
slower than an on-device generator; CUDA's Philox stream would, however, give a different ``R``.

Caching: a rademacher projector from :func:`make_projector` keeps the signs of ``R`` packed,
one bit per entry, when they take at most ``2**24`` bytes (``P * ceil(d / 8)``; ``P * d`` up to
about 1.3e8) and ``d`` is a multiple of 8 or at least 64 (unpacked rows are padded to a multiple
of 8 columns); every call then unpacks the rows it needs (about 8x faster than drawing them) and
holds no dense ``R``; :meth:`Projector.kept` holds the dense ``R`` (up to ``2**22`` entries) for
a block of calls. Other projectors (other kinds, ``packed=False``, the one-call functions)
keep a dense ``R`` with at most ``2**22`` stored entries (``P * d`` for dense kinds,
``P * nnz`` for sjlt: 16 MiB of float32) after the first call, once per ``(dtype, device)``.
Larger ones regenerate ``R`` block by block on every call and hold only their settings. Every
path uses the same draws and the same accumulation order, so all return bit-identical results
(on the CPU; a held rademacher ``R`` with ``d`` not a multiple of 8 is a strided view, which a
GPU BLAS may sum in another order).

Kronecker-factored projections of per-layer gradients: :mod:`dattri_fn.transforms.kronecker`.

References:
    Choe et al., "What is Your Data Worth to GPT?" (2024), arXiv:2405.13954 (LoGra).
    "GraSS: Scalable Data Attribution with Gradient Sparsification and Sparse
    Projection" (2025), arXiv:2505.18976 (masks, FactGraSS).
    Johnson & Lindenstrauss, "Extensions of Lipschitz mappings into a Hilbert space" (1984).
    Achlioptas, "Database-friendly random projections" (PODS 2001 / JCSS 2003).
    Charikar, Chen & Farach-Colton, "Finding frequent items in data streams" (ICALP 2002).
    Kane & Nelson, "Sparser Johnson-Lindenstrauss Transforms" (2014), arXiv:1012.1577.
    Park et al., "TRAK: Attributing Model Behavior at Scale" (2023), arXiv:2303.14186.
The :class:`Projector` (how ``R`` is drawn, kept and applied) and the input checks live in
:mod:`dattri_fn.transforms.projector`; its names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import _msg, check_int
from .projector import (  # noqa: F401
    _MASK64,
    KINDS,
    Projector,
    _block_seed,
    _check_features,
    _check_settings,
    _device_key,
    _splitmix64,
    _tree_columns,
)


def make_projector(dim: int, *, proj_dim: int, kind: str = "rademacher", seed: int = 0,
                   nnz: int = 1, chunk_size: int | None = None,
                   dtype: torch.dtype | None = None, device=None,
                   packed: bool = True) -> Projector:
    """Return a seeded projector ``X -> X R`` with ``E[R R^T] = I``.  # [B, P] -> [B, d]

    Args:
        dim: ``P``, the number of input features.
        proj_dim: ``d``, the number of output features.
        kind: ``"gaussian"``, ``"rademacher"`` or ``"sjlt"`` (see the module docstring).
        seed: non-negative int; the same ``(dim, proj_dim, kind, seed, nnz)`` always gives the
            same ``R``, on any device and in any dtype.
        nnz: non-zeros per row of ``R`` for ``"sjlt"`` (1 = count-sketch); ``<= proj_dim``.
        chunk_size: rows of ``R`` materialised at once, rounded up to whole blocks; ``None``
            picks about 2**22 entries per step. It bounds memory and does not change ``R``.
        dtype: default dtype of :meth:`Projector.matrix` (calls follow their input).
        device: default device of :meth:`Projector.matrix` (calls follow their input).
        packed: keep a rademacher ``R`` between calls as packed signs (one bit per entry,
            unpacked per call; :meth:`Projector.kept` holds it dense for a pass). False: keep
            a dense ``R`` of up to 2**22 entries instead (faster per call, 16-32x the memory),
            e.g. for a projector that lives for one pass only.

    Returns:
        A :class:`Projector`.

    Raises:
        TypeError: a setting of the wrong type.
        ValueError: ``dim``/``proj_dim``/``nnz``/``chunk_size`` < 1, ``seed`` < 0, an unknown
            ``kind`` (the message lists the allowed ones), or ``nnz > proj_dim`` for sjlt.

    Example:
        >>> proj = make_projector(10, proj_dim=4, kind="gaussian", seed=1, dtype=torch.float64)
        >>> X = torch.randn(3, 10, dtype=torch.float64)
        >>> torch.allclose(proj(X), X @ proj.matrix())
        True
    """
    func = "make_projector"
    check_int(func, "dim", dim, minimum=1)
    _check_settings(func, proj_dim=proj_dim, kind=kind, seed=seed, nnz=nnz,
                    chunk_size=chunk_size)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(_msg(func, "dtype", "a floating torch.dtype or None", repr(dtype)))
    device = torch.device("cpu" if device is None else device)
    if not isinstance(packed, bool):
        raise TypeError(_msg(func, "packed", "a bool", type(packed).__name__))
    return Projector(dim, proj_dim, kind, seed, nnz, chunk_size, dtype, device, packed)


def project(features: Tensor, *, proj_dim: int, kind: str = "rademacher", seed: int = 0,
            nnz: int = 1, chunk_size: int | None = None) -> Tensor:
    """Return ``features @ R`` for the seeded random ``R`` of :func:`make_projector`.  # [B, P] -> [B, d]

    Args:
        features: ``[B, P]`` (or a ``[P]`` vector, giving ``[d]``), finite floats.
        proj_dim, kind, seed, nnz, chunk_size: as in :func:`make_projector`.

    Returns:
        ``[B, d]`` (or ``[d]``) in the dtype and on the device of ``features``.

    Raises:
        TypeError: ``features`` not a floating tensor, or a setting of the wrong type.
        ValueError: ``features`` not 1-d/2-d or not finite, or a bad setting.
    """
    func = "project"
    X = _check_features(func, features, None)
    _check_settings(func, proj_dim=proj_dim, kind=kind, seed=seed, nnz=nnz,
                    chunk_size=chunk_size)
    proj = Projector(X.shape[-1], proj_dim, kind, seed, nnz, chunk_size, X.dtype, X.device,
                     packed=False)
    if X.ndim == 1:
        return proj._apply(lambda a, b: X[a:b].unsqueeze(0), 1, X.dtype, X.device)[0]
    return proj._apply(lambda a, b: X[:, a:b], X.shape[0], X.dtype, X.device)


def project_tree(grads: Mapping[str, Tensor], *, proj_dim: int, kind: str = "rademacher",
                 seed: int = 0, nnz: int = 1, chunk_size: int | None = None) -> Tensor:
    """Return ``ravel_batched(grads) @ R`` layer by layer, never concatenating all layers.  # -> [B, d]

    Each layer meets its own row block of the same ``R`` that :func:`project` uses for the
    raveled ``[B, P]`` features, so the two agree to round-off.

    Args:
        grads: ``{name: [B, *shape]}`` per-sample gradients (dict order = ravel order), one
            shared ``B``, dtype and device.
        proj_dim, kind, seed, nnz, chunk_size: as in :func:`make_projector`.

    Returns:
        ``[B, d]`` in the dtype and on the device of ``grads``.

    Raises:
        TypeError: ``grads`` not a non-empty dict of floating tensors, or a bad setting type.
        ValueError: leaves disagree on ``B``/dtype/device, hold NaN/inf, or a bad setting.
    """
    func = "project_tree"
    _check_settings(func, proj_dim=proj_dim, kind=kind, seed=seed, nnz=nnz,
                    chunk_size=chunk_size)
    cols, batch, dim, dtype, device = _tree_columns(func, "grads", grads, None)
    proj = Projector(dim, proj_dim, kind, seed, nnz, chunk_size, dtype, device, packed=False)
    return proj._apply(cols, batch, dtype, device)


def bfloat16_is_fast(device) -> bool:
    """Return True when ``device`` multiplies bfloat16 matrices natively (faster than float32).

    CUDA: compute capability 8.0 or newer (tensor cores with bfloat16). CPU: the AVX512-BF16 or
    AMX instructions, as torch detects them (without them a bfloat16 GEMM is emulated, slower
    than float32). Other devices: False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)
    return False
