"""The Projector value: ``R`` drawn block by block from seeded generators, kept packed or dense, in chunks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .._checks import _msg

# validation and tree columns (moved to projector_inputs; importable from here, as before)
from .projector_inputs import (  # noqa: F401
    KINDS,
    _check_features,
    _check_settings,
    _tree_columns,
)

_MASK64 = (1 << 64) - 1
_BLOCK_ENTRIES = 2**21  # entries drawn per generator seed; fixes the definition of R
_MAX_BLOCK_ROWS = 2**16
_CHUNK_ENTRIES = 2**22  # default materialised per step: 16 MiB of float32
_CACHE_ENTRIES = 2**22  # a dense R is kept when it stores at most this many entries
_BITS_BYTES = 2**24  # a rademacher R's signs are kept packed up to this many bytes
_SJLT_STEP_ENTRIES = 2**20  # bounds the [B, rows] temporary of one index_add_
_UNPACK_BYTES = 2**13  # packed sign bytes unpacked per index_select (a 32 KiB int32 index)
_SIGN_BYTES = 2**20  # up to this P * ceil(d / 8) * 8, the signs are also kept one byte each

ColumnFn = Callable[[int, int], Tensor]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _block_seed(seed: int, block: int) -> int:
    """Return the generator seed of row block ``block``; well mixed so nearby seeds decorrelate."""
    return _splitmix64((_splitmix64(seed) + block) & _MASK64)


def _block_rows(kind: str, proj_dim: int, nnz: int) -> int:
    width = nnz if kind == "sjlt" else proj_dim
    return max(1, min(_MAX_BLOCK_ROWS, _BLOCK_ENTRIES // width))


def _segments(proj_dim: int, nnz: int) -> tuple[Tensor, Tensor]:
    """Return ``(start, length)`` of the ``nnz`` near-equal segments of ``[0, d)``.  # [nnz] x 2"""
    bounds = torch.tensor([(j * proj_dim) // nnz for j in range(nnz + 1)], dtype=torch.int64)
    return bounds[:-1], bounds[1:] - bounds[:-1]


class Projector:
    """A seeded random projection ``X -> X R`` with ``R`` generated block by block.  # [B, P] -> [B, d]

    Build it with :func:`make_projector`. Calling it accepts a ``[B, P]`` tensor, a ``[P]``
    vector (returns ``[d]``) or a dict ``{name: [B, *shape]}`` of per-sample gradients whose
    raveled length is ``P`` (returns ``[B, d]``, equal to projecting
    ``dattri_fn.tree.ravel_batched(grads)``). Output dtype and device follow the input; a
    bfloat16/float16 input is multiplied in that precision (fast where the hardware has
    half-precision matrix units) and summed over ``R``'s row steps in float32.

    Attributes:
        dim: ``P``, the input dimension.
        proj_dim: ``d``, the output dimension.
        kind: one of :data:`KINDS`.
        seed: the integer that fixes ``R``.
        nnz: non-zeros per row of ``R`` (sjlt only; 1 otherwise).
        chunk_size: rows of ``R`` materialised at once (``None``: about 2**22 entries).
        dtype, device: defaults of :meth:`matrix` only.
        packed: whether a rademacher ``R`` is kept as packed signs (see the module docstring).
        block_rows: rows per generator seed (part of the definition of ``R``).
    """

    __slots__ = ("dim", "proj_dim", "kind", "seed", "nnz", "chunk_size", "dtype", "device",
                 "packed", "block_rows", "_cache", "_bits", "_bytes")

    def __init__(self, dim: int, proj_dim: int, kind: str, seed: int, nnz: int,
                 chunk_size: int | None, dtype: torch.dtype, device: torch.device,
                 packed: bool = True):
        self.dim = dim
        self.proj_dim = proj_dim
        self.kind = kind
        self.seed = seed
        self.nnz = nnz
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.device = device
        self.packed = packed
        self.block_rows = _block_rows(kind, proj_dim, nnz)
        self._cache: dict = {}
        self._bits: dict = {}
        self._bytes: dict = {}

    # -- definition of R -----------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The factor that turns the raw +-1 / N(0, 1) draws into ``R``."""
        return 1.0 / math.sqrt(self.nnz if self.kind == "sjlt" else self.proj_dim)

    @property
    def cacheable(self) -> bool:
        """True when ``R`` is kept after the first call: as packed signs (a rademacher ``R``
        whose signs fit 2**24 bytes, see the module docstring) or dense (at most 2**22
        stored entries)."""
        return self._packable or self._dense_keepable

    @property
    def holdable(self) -> bool:
        """True when ``R`` stores at most 2**22 entries: calls reuse a dense ``R``, kept after
        the first call or, for packed signs, held by :meth:`kept`."""
        return self._dense_keepable

    def held_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the dense ``R`` that :meth:`kept` holds in ``dtype`` (0: it holds none)."""
        if not (self._packable and self._dense_keepable):
            return 0
        return self.dim * -(-self.proj_dim // 8) * 8 * dtype.itemsize

    @property
    def _packable(self) -> bool:
        d = self.proj_dim
        return (self.packed and self.kind == "rademacher" and (d % 8 == 0 or d >= 64)
                and self.dim * -(-d // 8) <= _BITS_BYTES)

    @property
    def _dense_keepable(self) -> bool:
        width = self.nnz if self.kind == "sjlt" else self.proj_dim
        return self.dim * width <= _CACHE_ENTRIES

    @contextlib.contextmanager
    def kept(self, dtype: torch.dtype, device):
        """Hold the dense ``R`` for calls in ``dtype`` on ``device`` until the block exits.

        For a caller that makes many calls in a row (one per batch) with packed signs: they
        are unpacked once, not once per call. A no-op where :meth:`held_bytes` is 0 (other
        projectors keep a small ``R`` after their first call anyway) or when already held.
        """
        key = (dtype, _device_key(device))
        if key in self._cache or not self.held_bytes(dtype):
            yield self
            return
        self._raw(0, 0, dtype, key[1], _float16_shift(self.scale)
                  if dtype == torch.float16 else 1.0, keep=True)
        try:
            yield self
        finally:
            self._cache.pop(key, None)

    def _steps(self) -> list[tuple[int, int]]:
        """Return the row ranges materialised one at a time (whole blocks each)."""
        br = self.block_rows
        if self.chunk_size is None:
            width = self.nnz if self.kind == "sjlt" else self.proj_dim
            blocks = max(1, _CHUNK_ENTRIES // (br * width))
        else:
            blocks = max(1, -(-self.chunk_size // br))
        rows = blocks * br
        return [(a, min(a + rows, self.dim)) for a in range(0, self.dim, rows)]

    def _blocks(self, start: int, stop: int):
        """Yield ``(block_start, block_stop, generator)`` covering rows ``[start, stop)``."""
        br = self.block_rows
        for c in range(start // br, -(-stop // br)):
            g = torch.Generator().manual_seed(_block_seed(self.seed, c))
            yield c * br, min((c + 1) * br, self.dim), g

    def _raw_dense(self, start: int, stop: int, out: Tensor | None = None,
                   small: bool = False) -> Tensor:
        """Return the unscaled rows ``[start, stop)`` of ``R`` on the CPU, in ``out`` or new:
        float32, or with ``small`` int8 for rademacher (the same draws in a quarter of the
        memory, for a caller that converts them anyway).  # [n, d]"""
        if out is None:
            small = small and self.kind == "rademacher"
            out = torch.empty(stop - start, self.proj_dim,
                              dtype=torch.int8 if small else torch.float32)
        for a, b, g in self._blocks(start, stop):
            view = out[a - start:b - start]
            if self.kind == "gaussian":
                torch.randn(view.shape, generator=g, out=view)
            else:
                torch.randint(0, 2, view.shape, generator=g, out=view).mul_(2).sub_(1)
        return out

    def _raw_sjlt(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Return the columns and signs of rows ``[start, stop)`` of ``R``.  # [n, nnz] x 2"""
        seg_start, seg_len = _segments(self.proj_dim, self.nnz)
        n = stop - start
        idx = torch.empty(n, self.nnz, dtype=torch.int64)
        sgn = torch.empty(n, self.nnz, dtype=torch.float32)
        for a, b, g in self._blocks(start, stop):
            u = torch.rand(b - a, self.nnz, generator=g, dtype=torch.float64)
            # floor(u * len) < len for u < 1; the clamp guards the float64 rounding edge.
            off = torch.minimum((u * seg_len).long(), seg_len - 1)
            idx[a - start:b - start] = seg_start + off
            torch.randint(0, 2, (b - a, self.nnz), generator=g, out=sgn[a - start:b - start])
        sgn.mul_(2).sub_(1)
        return idx, sgn

    def _signs(self, device: torch.device) -> Tensor:
        """Return the rademacher draws packed: bit ``j`` of byte ``k`` of row ``i`` is 1 where
        ``R[i, 8k + j] > 0``, drawn once per device.  # uint8 [P, ceil(d / 8)]"""
        if device not in self._bits:
            d8 = -(-self.proj_dim // 8)
            bits = torch.zeros(self.dim, d8, dtype=torch.uint8)
            for a, b, g in self._blocks(0, self.dim):
                draws = torch.zeros(b - a, d8 * 8, dtype=torch.uint8)
                torch.randint(0, 2, (b - a, self.proj_dim), generator=g,
                              out=draws[:, :self.proj_dim])
                draws = draws.view(b - a, d8, 8)
                for j in range(8):
                    bits[a:b] |= draws[..., j] << j
            self._bits[device] = bits.to(device)
        return self._bits[device]

    def _sign_bytes(self, device: torch.device) -> Tensor | None:
        """Return the packed signs as int8 ``+-1``, one byte per entry, or None when they would
        take over 2**20 bytes: a small ``R`` is then widened by one cast per pass instead of a
        table lookup per byte (about 5x faster on the digits tasks' ``R``).  # int8 [P, 8 ceil(d / 8)]
        """
        width = -(-self.proj_dim // 8) * 8
        if self.dim * width > _SIGN_BYTES:
            return None
        if device not in self._bytes:
            bits = self._signs(device)
            signs = ((bits[:, :, None] >> torch.arange(8, device=device, dtype=torch.uint8))
                     & 1).to(torch.int8)
            self._bytes[device] = signs.mul_(2).sub_(1).view(self.dim, width)
        return self._bytes[device]

    def _unpacked(self, start: int, stop: int, dtype: torch.dtype, device: torch.device,
                  shift: float = 1.0, out: Tensor | None = None) -> Tensor:
        """Return raw rows ``[start, stop)`` (``+-shift``) from the packed signs.  # [n, d]

        The result is a column slice of a ``[n, 8 ceil(d / 8)]`` tensor (``out``'s storage when
        given).
        """
        small = self._sign_bytes(device)
        if small is not None:
            rows = small[start:stop]
            out = rows.to(dtype) if out is None else out.copy_(rows)
            return (out if shift == 1.0 else out.mul_(shift))[:, :self.proj_dim]
        bits = self._signs(device)[start:stop]
        table = ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device))
                 & 1).to(dtype).mul_(2 * shift).sub_(shift)  # [256, 8]: byte -> its 8 signs
        n, d8 = bits.shape
        if out is None:
            out = torch.empty(n, d8 * 8, dtype=dtype, device=device)
        # by row blocks: the int32 index of a block is 4x its packed bytes, kept small
        step = max(1, _UNPACK_BYTES // d8)
        for s in range(0, n, step):
            torch.index_select(table, 0, bits[s:s + step].reshape(-1).int(),
                               out=out[s:s + step].view(-1, 8))
        return out[:, :self.proj_dim]

    def _raw(self, start: int, stop: int, dtype: torch.dtype, device: torch.device,
             shift: float = 1.0, keep: bool = False):
        """Return the raw rows ``[start, stop)`` moved to ``(dtype, device)`` and times ``shift``
        (a power of two, dense kinds only): from a held dense ``R``, from the packed signs, or
        kept after this call if small (``keep``: into the held dense ``R`` even with packed
        signs)."""
        key = (dtype, device)
        if key not in self._cache and self._packable and not keep:
            return self._unpacked(start, stop, dtype, device, shift)
        if self._dense_keepable:
            if key not in self._cache:
                self._cache[key] = (self._unpacked(0, self.dim, dtype, device, shift)
                                    if self._packable else
                                    self._raw_uncached(0, self.dim, dtype, device))
                if shift != 1.0 and not self._packable:
                    self._cache[key].mul_(shift)
            full = self._cache[key]
            if isinstance(full, tuple):
                return full[0][start:stop], full[1][start:stop]
            return full[start:stop]
        R = self._raw_uncached(start, stop, dtype, device)
        return R if shift == 1.0 else R.mul_(shift)

    def _raw_uncached(self, start, stop, dtype, device):
        if self.kind == "sjlt":
            idx, sgn = self._raw_sjlt(start, stop)
            return idx.to(device), sgn.to(device=device, dtype=dtype)
        converted = dtype != torch.float32 or torch.device(device).type != "cpu"
        return self._raw_dense(start, stop, small=converted).to(device=device, dtype=dtype)

    # -- application ---------------------------------------------------------------------
    def _apply(self, cols: ColumnFn, batch: int, dtype: torch.dtype,
               device: torch.device, out: Tensor | None = None) -> Tensor:
        """Return ``sum_steps cols(a, b) @ R[a:b]``.  # -> [B, d]

        Half-precision inputs (bfloat16/float16) are multiplied in their dtype, where matrix
        units are fast, and the steps are summed in float32, so rounding does not grow with P.
        For float16 (max 65504) the dense ``R`` is first scaled by the power of two nearest
        below ``1 / sqrt(d)`` (exact), so a product overflows only when the output nearly does.
        ``out``: a ``[B, d]`` tensor (a view is fine) that receives the result and is
        returned; in the accumulation dtype it is summed into directly (no ``[B, d]``
        temporary), the same operations in the same order.
        """
        acc = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        shift = _float16_shift(self.scale) if dtype == torch.float16 else 1.0
        into = out
        if out is not None and out.dtype == acc:
            out = out.zero_()
        else:
            out = torch.zeros(batch, self.proj_dim, dtype=acc, device=device)
        sub = max(1, _SJLT_STEP_ENTRIES // max(batch, 1))
        steps = self._steps()
        streamed = self.kind != "sjlt" and not self.cacheable
        unpack = self._packable and (dtype, device) not in self._cache
        # One buffer (two off-CPU or off-float32) per call, refilled per step: allocating per
        # step lets the C allocator's dynamic thresholds keep several freed copies resident.
        rows = max(b - a for a, b in steps)
        if streamed:
            raw = torch.empty(rows, self.proj_dim, dtype=torch.float32)
            same = dtype == torch.float32 and device.type == "cpu"
            moved = raw if same else torch.empty(rows, self.proj_dim, dtype=dtype, device=device)
        elif unpack:
            signs = torch.empty(rows, -(-self.proj_dim // 8) * 8, dtype=dtype, device=device)
        for a, b in steps:
            X = cols(a, b)
            if self.kind == "sjlt":
                X = X.to(acc)
                idx, sgn = self._raw(a, b, acc, device)
                for j in range(self.nnz):
                    for c in range(0, b - a, sub):
                        out.index_add_(1, idx[c:c + sub, j], X[:, c:c + sub] * sgn[c:c + sub, j])
            elif streamed:
                R = self._raw_dense(a, b, out=raw[:b - a])
                if not same:
                    R = moved[:b - a].copy_(R)
                _add_product(out, X, R if shift == 1.0 else R.mul_(shift))
            elif unpack:
                _add_product(out, X, self._unpacked(a, b, dtype, device, shift, signs[:b - a]))
            else:
                _add_product(out, X, self._raw(a, b, dtype, device, shift))
        out.mul_(self.scale / shift)
        if into is None:
            return out.to(dtype)
        return into if into is out else into.copy_(out)

    def __call__(self, features: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Return ``X R`` for ``[B, P]``, ``[P]`` or ``{name: [B, *shape]}``.  # -> [B, d] / [d]

        Raises:
            TypeError: not a floating tensor or a dict of them.
            ValueError: wrong shape or raveled size, NaN/inf, or leaves that disagree.
        """
        name = "Projector"
        if isinstance(features, Mapping):
            cols, batch, _, dtype, device = _tree_columns(name, "grads", features, self.dim)
            return self._apply(cols, batch, dtype, device)
        X = _check_features(name, features, self.dim)
        if X.ndim == 1:
            return self._apply(lambda a, b: X[a:b].unsqueeze(0), 1, X.dtype, X.device)[0]
        return self._apply(lambda a, b: X[:, a:b], X.shape[0], X.dtype, X.device)

    def apply_columns(self, cols: ColumnFn, rows: int, *, dtype: torch.dtype,
                      device, out: Tensor | None = None) -> Tensor:
        """Return ``X R`` for an ``X`` given as column blocks ``cols(a, b) -> [rows, b - a]``.  # [rows, d]

        ``X`` is never formed whole: each step of ``R``'s rows meets only its own columns (for
        example :meth:`dattri_fn.transforms.layer_grads.LayerGrads.columns`), so memory is bounded by
        one step. The blocks are not validated: they must be finite, of ``dtype`` on
        ``device``. ``out``: a ``[rows, d]`` tensor (e.g. rows of a feature cache) written and
        returned: in ``dtype`` (float32/float64) it is accumulated into in place, with no
        ``[rows, d]`` temporary; the values equal those returned without it.
        """
        if out is not None and (not isinstance(out, Tensor)
                                or tuple(out.shape) != (rows, self.proj_dim)):
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(_msg("Projector.apply_columns", "out", f"a Tensor of shape "
                                  f"[{rows}, {self.proj_dim}]", f"{got}"))
        return self._apply(cols, rows, dtype, torch.device(device), out)

    def matrix(self, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """Return the dense ``R`` with ``projector(X) == X @ R`` (for tests and small P).  # [P, d]

        Args:
            dtype: defaults to the projector's ``dtype``.
            device: defaults to the projector's ``device``.
        """
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else torch.device(device)
        if self.kind == "sjlt":
            idx, sgn = self._raw_uncached(0, self.dim, dtype, device)
            R = torch.zeros(self.dim, self.proj_dim, dtype=dtype, device=device)
            return R.scatter_(1, idx, sgn * self.scale)
        return self._raw_uncached(0, self.dim, dtype, device).mul_(self.scale)

    def __repr__(self) -> str:
        extra = f", nnz={self.nnz}" if self.kind == "sjlt" else ""
        return (f"Projector(dim={self.dim}, proj_dim={self.proj_dim}, kind={self.kind!r}, "
                f"seed={self.seed}{extra}, chunk_size={self.chunk_size})")


def _device_key(device) -> torch.device:
    """``device`` with its index: ``"cuda"`` is the current CUDA device, as tensors report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _float16_shift(scale: float) -> float:
    """The power of two at or below ``scale``: multiplying float16 values by it is exact."""
    return 2.0 ** math.floor(math.log2(scale))


def _add_product(out: Tensor, X: Tensor, R: Tensor) -> None:
    """``out += X @ R``; a half-precision product is rounded once, then added in ``out``'s dtype."""
    if X.dtype == out.dtype:
        out.addmm_(X, R)
    else:
        out.add_(X @ R)
