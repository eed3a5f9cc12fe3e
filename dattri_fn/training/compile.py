"""``torch.compile`` of MAGIC's reverse step with the step's scalars as graph inputs.

:func:`~dattri_fn.attribute.metagradient.metagradient` walks a run backward with one
:func:`torch.func.vjp` of the step per state and its pullback vmapped over the targets.
:class:`ReverseStep` compiles that per-chunk function ``(floats, scalars, batch, w, cotangents)
-> (state cotangents, weight cotangents)`` ONCE for every step: the optimizer state's int
``count`` (a constant dynamo guards on, so an int in the graph recompiled at every step) is
replaced by :class:`~dattri_fn.training.steps.StepScalars`, the Python floats the step uses
(``Optimizer.scalars(count)``) as 0-d float64 tensors, and the rows dimension of the
cotangents and of the batch is marked dynamic (early exit narrows the targets, the last batch
may be short). Values equal the eager step's in exact arithmetic (float32: round-off; the
scalars are the same Python floats). One graph per SHAPE: the rows of the cotangents chunk (early
exit narrows them) and of the batch (a short last batch) are static, because marking them dynamic
failed: the vjp / vmap trace specializes them (torch 2.13, ``ConstraintViolationError``).

It applies to a ``vjp_step`` made by :func:`~dattri_fn.training.make_step` (it carries its
``optimizer``) on an :class:`~dattri_fn.training.SGDState`/``AdamState``; otherwise, or when a
compile fails (no C++ compiler, an unsupported op, a graph break under ``fullgraph``), or when
the graphs compiled exceed ``max_graphs``, or a NEW graph's output on its first chunk differs
from the eager step's by more than round-off (1e-4 relative in float32, 1e-9 in float64: a spot
check per graph, not per step), it warns ONCE naming the reason and returns None: the caller runs
the eager step (the same values to round-off).

Cost (``benchmarks/magic_compile_lm.py``, ``benchmarks/magic_compile.py``): a cold inductor
compile is 17-21 thread CPU-s (31-54 with the C++ compiler's child processes) per graph on
digits-cnn and 53 / 103 on text-lm, where inductor's values were O(1) off eager's (the traced
graph under ``aot_eager``: 2e-7; the first-chunk check catches it); see benchmarks/RESULTS.md
before turning it on.
"""

from __future__ import annotations

import itertools
import types
import warnings
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .steps import AdamState, SGDState, StepScalars

# Graphs per ReverseStep (dynamo's recompile limit per code object is 8; fullgraph=True makes
# hitting it an error, which falls back to eager with the warning).
MAX_GRAPHS = 8
_IDS = itertools.count()


def _reason(err: BaseException) -> str:
    """``Type: first line`` of the innermost error (dynamo wraps a backend's own error)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None:
            break
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


# The largest relative difference (per output, to its largest entry) a new graph may show
# against the eager step: float32 drift measured 2e-7 (aot_eager, text-lm) to 3e-6 (inductor,
# digits-cnn).
_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _eager_chunk(vjp_step, floats, how, batch, w_rows, part):
    """metagradient's eager reverse step on one chunk (the int count as it is)."""
    leaves, spec, mask = how

    def one_step(floats_t, w):
        it = iter(floats_t)
        params, opt_state = tree_unflatten([next(it) if m else x
                                            for x, m in zip(leaves, mask, strict=True)], spec)
        return [x for x in tree_flatten(vjp_step(params, opt_state, batch, w))[0]
                if isinstance(x, Tensor) and x.is_floating_point()]

    _, pullback = vjp(one_step, list(floats), w_rows)
    return vmap(pullback)(part)


def _rel_gap(out, ref) -> float:
    """The largest ``max|a - b| / max|b|`` over the outputs (NaN where one is not finite)."""
    a = [*out[0], out[1]]
    b = [*ref[0], ref[1]]
    gap = 0.0
    for x, y in zip(a, b, strict=True):
        scale = float(y.abs().max()) if y.numel() else 0.0
        diff = float((x - y).abs().max()) if y.numel() else 0.0
        if diff != diff or scale != scale:
            return float("nan")
        gap = max(gap, diff / scale if scale > 0 else diff)
    return gap


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reverse_step(vjp_step: Callable, backend: str | Callable = "inductor") -> ReverseStep:
    """The :class:`ReverseStep` of ``vjp_step`` and ``backend``, one per pair while ``vjp_step``
    lives: the runs of an ensemble (one ``vjp_step``) share its compiled graphs."""
    try:
        per_step = _CACHE.setdefault(vjp_step, {})
    except TypeError:  # not weak-referenceable: no sharing
        return ReverseStep(vjp_step, backend)
    if backend not in per_step:
        per_step[backend] = ReverseStep(vjp_step, backend)
    return per_step[backend]


class ReverseStep:
    """``(floats, how, batch, w_rows, bar, chunk_size) -> (bar', rows_bar) | None``: one reverse
    step of :func:`~dattri_fn.attribute.metagradient.metagradient` through a compiled graph
    (None: not applicable or failed, warned once; run the eager step).

    Args:
        vjp_step: the step differentiated (from :func:`~dattri_fn.training.make_step`).
        backend: ``torch.compile``'s backend (``"inductor"``; ``"eager"``/``"aot_eager"`` or a
            callable for tests).
        max_graphs: the most graphs compiled before giving up (warned, eager from then on).
    """

    def __init__(self, vjp_step: Callable, backend: str | Callable = "inductor", *,
                 max_graphs: int = MAX_GRAPHS):
        self.vjp_step = vjp_step
        self.backend = backend
        self.max_graphs = max_graphs
        self.graphs = 0  # graphs handed to the backend (each compile; a recompile adds one)
        self.reason: str | None = None  # why the compiled path is off (warned once)
        self._structure = None
        optimizer = getattr(vjp_step, "optimizer", None)
        self.scalars = getattr(optimizer, "scalars", None)
        if self.scalars is None:
            self._off("vjp_step carries no optimizer with a scalars form (make it with "
                      "dattri_fn.training.make_step and sgd/adam/adamw)")
        # A code object of its own: dynamo keeps its graphs (and counts its recompile limit) per
        # code object, so instances sharing _chunk's would evict and count each other's.
        fn = ReverseStep._chunk
        code = fn.__code__.replace(co_name=f"_chunk_{next(_IDS)}")
        chunk = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                   fn.__closure__)
        self._fn = torch.compile(types.MethodType(chunk, self), backend=self._counting,
                                 fullgraph=True, dynamic=False)

    def _off(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            warnings.warn(f"metagradient(compile=...): running the eager reverse step: {reason}.",
                          RuntimeWarning, stacklevel=4)

    def _counting(self, gm, example_inputs):
        self.graphs += 1
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        if callable(self.backend):
            return self.backend(gm, example_inputs)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)

    def _state(self, floats, count):
        template, spec, mask, at = self._structure
        it = iter(floats)
        return tree_unflatten([count if i == at else (next(it) if m else x)
                               for i, (x, m) in enumerate(zip(template, mask, strict=True))], spec)

    def _chunk(self, floats, scalars, batch, w_rows, part):
        count = StepScalars(scalars)

        def one_step(floats_t, w):
            params, opt_state = self._state(floats_t, count)
            out = self.vjp_step(params, opt_state, batch, w)
            return [x for x in tree_flatten(out)[0]
                    if isinstance(x, Tensor) and x.is_floating_point()]

        _, pullback = vjp(one_step, floats, w_rows)
        return vmap(pullback)(part)

    def _prepare(self, how) -> int | None:
        """Return the count of the state ``how`` describes (caching its structure), or None."""
        leaves, spec, mask = how
        state = tree_unflatten(leaves, spec)[1]
        if not isinstance(state, (SGDState, AdamState)) or not isinstance(state.count, int):
            self._off(f"the optimizer state is a {type(state).__name__}, not the SGDState/"
                      "AdamState with an int count of dattri_fn.training")
            return None
        at = [i for i, (x, m) in enumerate(zip(leaves, mask, strict=True))
              if not m and not isinstance(x, Tensor)]
        if len(at) != 1:
            self._off("the state holds other non-tensor leaves than its step count")
            return None
        template = [None if m else x for x, m in zip(leaves, mask, strict=True)]
        template[at[0]] = None
        if self._structure is None:
            self._structure = (template, spec, list(mask), at[0])
        elif self._structure[1] != spec or self._structure[2] != list(mask):
            self._off("the state's structure changed between steps")
            return None
        return leaves[at[0]]

    def __call__(self, floats: Sequence[Tensor], how, batch, w_rows: Tensor,
                 bar: Sequence[Tensor], chunk_size: int | None):
        if self.reason is not None:
            return None
        count = self._prepare(how)
        if count is None:
            return None
        device = floats[0].device
        scalars = tuple(torch.tensor(float(v), dtype=torch.float64, device=device)
                        for v in self.scalars(count))
        k = bar[0].shape[0]
        size = k if chunk_size is None else chunk_size
        outs = []
        for lo in range(0, k, size):
            part = [b[lo:lo + size].contiguous() for b in bar]
            before = self.graphs
            try:
                out = self._fn(list(floats), scalars, batch, w_rows, part)
            except Exception as err:  # a failed compile must not end the pass: eager instead
                self._off(f"torch.compile failed ({_reason(err)})")
                return None
            if self.graphs > before:
                # A new graph: checked once against the eager step on this chunk (inductor's
                # text-lm reverse step was O(1) off while the traced graph was right).
                ref = _eager_chunk(self.vjp_step, floats, how, batch, w_rows, part)
                gap = _rel_gap(out, ref)
                if not gap <= _TOL.get(floats[0].dtype, 1e-4):
                    self._off(f"the compiled step differs from the eager one by {gap:.3g} "
                              "relative (a miscompile?)")
                    return None
            if self.graphs > self.max_graphs:
                # Dynamo would soon run eager silently (its recompile limit): say so, stop here.
                self._off(f"{self.graphs} graphs compiled (at most {self.max_graphs} allowed: "
                          "something the graph depends on changes from step to step)")
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        n = len(bar)
        return ([torch.cat([o[0][i] for o in outs]) for i in range(n)],
                torch.cat([o[1] for o in outs]))


__all__ = ["MAX_GRAPHS", "ReverseStep", "reverse_step"]
