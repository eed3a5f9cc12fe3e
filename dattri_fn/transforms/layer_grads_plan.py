"""The capture plan of :mod:`dattri_fn.transforms.layer_grads` as a value: which layers a
model's plan captures (:func:`layer_plan`), and what a check decided about them, as plain values
(:class:`PlanDecisions`) that give the checked plan back (:func:`decided_plan`)."""

from __future__ import annotations

import itertools
import os
import sys
import warnings
import weakref
from typing import Any, NamedTuple

from .._checks import _msg
from ..model import FunctionalModel, bridged
from .layer_grads_ties import attributed_layers, tap_plan, tie_biases, tied_keys


class LayerPlan(NamedTuple):
    """A capture plan: the captured (factored) layers of a model and what its check decided.

    Built unchecked by :func:`layer_plan`; :func:`check_plan` returns a checked copy. Nothing
    writes to a plan once built: the functions that apply it only read it, so one plan can be
    shared by any number of calls (and threads) with the same results.

    Attributes:
        model: the :class:`~dattri_fn.model.FunctionalModel`.
        tapped: the capture engine's pure ``tapped`` function for ``layers``.
        layers: ``{layer: (weight key or None, bias key or None)}`` of the captured
            Kronecker-form layers (``dW = sum_t g_t a_t^T``; an Embedding's rows are formed
            per example but keep this form): the only layers a consumer sees as factored.
        rest: the attributed keys outside them, in params order: the dense block's keys.
            Those of ``norms`` are formed from the same capture pass, the others
            (:attr:`autodiff`) by ``vmap(grad)``.
        checked: whether the fields below were decided on an example batch.
        dense: every gradient is computed densely (the factors failed the check, or no
            layer is left to capture).
        loop: vmap cannot run the model: dense parameters (and several checkpoints) come
            from a loop of one backward pass per example (per checkpoint).
        layout: ``((layer, "flat" | "seq" | "dense"), ...)``: how each captured layer's
            factors are kept, decided by the example batch's positions ``T`` and kept for
            every batch, so blocks of any length line up.
        shapes: ``((input signature, {layer: probe shape}), ...)``: the example batch's probe
            shapes, for the paths that run under ``torch.func`` transforms (dense parameters
            next to captured layers, a caller's own transform); a batch of another signature
            costs one no-grad forward there.
        norms: ``{layer: (weight key or None, bias key or None)}`` of the captured affine
            LayerNorms: elementwise (``dw = sum_t g_t * xhat_t``, ``db = sum_t g_t``), not
            Kronecker, so their rows go to the dense block under their keys (kept in
            ``rest``): consumers of ``layers`` and of the dense block need not know them.
        ties: ``{key: its layers}``: a weight tied between layers of different kinds (GPT-2's
            ``wte`` and ``lm_head``), its rows the sum of theirs, in the dense block too
            (:mod:`~dattri_fn.transforms.layer_grads_ties`); its layers are in no other field.
        tie_biases: ``{bias key: its layer}``: the attributed bias of a tie member (BERT-MLM's
            decoder bias), its rows ``sum_t g_t`` from the same pass, in the dense block too.
        tie_factors: the tied keys of Embedding and Linear members are kept as those members'
            factors (layout ``("t", key, TieFactors)``), their ``V D`` rows never
            formed whole: for a consumer that projects them (:func:`keep_tie_factors`).
        bare: the captured bare parameters' keys (each its own layer's name: a hand-written
            model's ``self.pos`` read by rows, :func:`~dattri_fn.transforms.capture.layer_specs`),
            their rows ``dW[v] = sum_{t: id_t = v} g_t`` written into the dense block from the
            same pass, as ``norms``' (kept in ``rest``).
    """

    model: FunctionalModel
    tapped: Any
    layers: dict[str, tuple[str | None, str | None]]
    rest: tuple[str, ...]
    checked: bool = False
    dense: bool = False
    loop: bool = False
    layout: tuple[tuple[str, str], ...] = ()
    shapes: tuple[tuple[tuple, dict[str, tuple[int, ...]]], ...] = ()
    norms: dict[str, tuple[str | None, str | None]] = {}
    ties: dict[str, tuple[str, ...]] = {}
    tie_biases: dict[str, str] = {}
    tie_factors: bool = False
    bare: tuple[str, ...] = ()

    # Defined in layer_grads before the split: pickles and pytree specs name it there.
    __module__ = "dattri_fn.transforms.layer_grads"

    @property
    def autodiff(self) -> tuple[str, ...]:
        """The keys of :attr:`rest` that take ``vmap(grad)`` (no captured norm or tie reads them)."""
        if not self.norms and not self.ties and not self.bare:
            return self.rest
        owned = ({k for pair in self.norms.values() for k in pair} | set(self.ties)
                 | set(self.tie_biases) | set(self.bare))
        return tuple(k for k in self.rest if k not in owned)

    @property
    def captured(self) -> tuple[str, ...]:
        """Every layer the capture pass reads, module order: :attr:`layers`, :attr:`norms` and
        the members of :attr:`ties`."""
        return tuple(self.tapped.layers)


UNBRIDGED = ("layer_plan(model=...): the FunctionalModel's loss ({loss}) is not the one "
             "functional_model built for its module, loss_fn and fixed tensors (replaced with "
             "_replace, or the FunctionalModel deep-copied: its loss still reads the original "
             "module): per-example gradients are computed densely by vmap(grad) of its loss.")


# a number per replaced loss, never reused while the process runs (an address is, once the
# loss is freed): the warning's text is new for every replaced model (review RF L4)
_SERIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEXT = itertools.count(1)


def _serial(loss) -> str:
    try:
        n = _SERIALS.get(loss)
        if n is None:
            n = _SERIALS.setdefault(loss, next(_NEXT))
        return f"replaced loss #{n}"
    except TypeError:  # not weakly referable or not hashable: its address
        return f"at {id(loss):#x}"


def user_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` (from the function calling this) of the first frame
    outside the ``dattri_fn`` package: the user's own call, however deep the library's path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(root):
        frame, level = frame.f_back, level + 1
    return level


def layer_plan(model: FunctionalModel) -> LayerPlan | None:
    """Return the unchecked capture plan of ``model``'s attributed layers (None: there is none).

    Every ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Conv2d`` and ``nn.Embedding`` with an
    attributed parameter is captured by :mod:`dattri_fn.transforms.capture` (no trace: any
    forward works), and so is every affine ``nn.LayerNorm``, tied weight and attributed bare
    1-D/2-D parameter read by rows, alone or not (their rows go to the dense block from the
    same pass: :attr:`LayerPlan.norms`, :attr:`LayerPlan.ties`, :attr:`LayerPlan.bare`; a
    bare parameter the check finds used otherwise is dropped after its one warning); every
    other attributed parameter stays dense (``vmap(grad)``).
    :func:`check_plan` checks it on an example batch (module Note); applying an unchecked plan
    checks it on every call. A model whose ``loss`` is not :func:`functional_model`'s own for
    its fields (:func:`~dattri_fn.model.bridged`; ``_replace(loss=...)``) gets None, warned.
    """
    if not isinstance(model, FunctionalModel):
        raise TypeError(f"layer_plan(model=...): expected a FunctionalModel from "
                        f"functional_model(...), got {type(model).__name__}.")
    if model.loss_fn is None:
        raise ValueError("layer_plan(model=...): expected a FunctionalModel built with a "
                         "loss_fn, got loss_fn=None.")
    if not bridged(model):
        # the capture differentiates module with loss_fn: for another loss it would attribute
        # the wrong function, silently (issue 14)
        # the loss named and numbered in the text: Python's default filter shows a text once
        # per call site, and a second replaced model must be warned too (review RG L3)
        loss = model.loss
        name = getattr(loss, "__qualname__", type(loss).__name__)
        warnings.warn(UNBRIDGED.format(loss=f"{name}, {_serial(loss)}"),
                      stacklevel=user_stacklevel())
        return None
    return _plan_of(model, attributed_layers(model.module, model.params))


def _plan_of(model: FunctionalModel, names: list[str]) -> LayerPlan | None:
    """The plan capturing ``names``; None without any. A plan of norms or tied weights alone
    has no ``layers`` (GPT-2 with ``wte`` or the LayerNorms attributed): one capture pass writes
    their rows into the dense block, which every consumer reads as any dense rows (a FactGraSS
    or Kronecker projection's rest, unless ``kronecker_layers`` gives a tie a block), with no
    ``vmap`` (a model vmap cannot run needs no per-example loop for them)."""
    if not names:
        return None
    tapped = tap_plan(model.module, names)
    ties = tied_keys(model.module, tapped, model.params)
    members = {m for group in ties.values() for m in group}
    keys = set(model.params)
    pairs = {n: (s.weight if s.weight in keys else None, s.bias if s.bias in keys else None)
             for n, s in tapped.specs.items() if n not in members}
    layers = {n: p for n, p in pairs.items() if tapped.specs[n].kind not in ("layernorm", "bare")}
    norms = {n: p for n, p in pairs.items() if tapped.specs[n].kind == "layernorm"}
    bare = tuple(p[0] for n, p in pairs.items() if tapped.specs[n].kind == "bare")
    owned = {k for pair in layers.values() for k in pair if k is not None}
    rest = tuple(k for k in model.params if k not in owned)
    return LayerPlan(model, tapped, layers, rest, norms=norms, ties=ties,
                     tie_biases=tie_biases(model.module, tapped, model.params, members), bare=bare)


class PlanDecisions(NamedTuple):
    """What :func:`check_plan` decided, as plain values: a method state holds these (saved,
    hashed and compared like any state, unlike a plan, which holds the model), and
    :func:`decided_plan` turns them back into the checked plan with no pass over data.

    Attributes:
        layers: the captured layers the check kept, :attr:`LayerPlan.norms` among them, in
            module order (the others were computed densely after its warning).
        dense, loop, layout: as :class:`LayerPlan`'s.
    """

    layers: tuple[str, ...]
    dense: bool
    loop: bool
    layout: tuple[tuple[str, str], ...]

    # Saved states and state_hash name the class by module: kept where it was defined before.
    __module__ = "dattri_fn.transforms.layer_grads"


def plan_decisions(plan: LayerPlan) -> PlanDecisions:
    """Return the decisions of a checked ``plan`` (:func:`check_plan`) as plain values.

    Its probe shapes are left out: a path that needs them (dense parameters next to captured
    layers, a caller's torch.func transform) runs one no-grad forward per batch instead, which
    gives the same shapes and so the same gradients.
    """
    if not isinstance(plan, LayerPlan) or not plan.checked:
        got = "an unchecked plan" if isinstance(plan, LayerPlan) else type(plan).__name__
        raise TypeError(_msg("plan_decisions", "plan", "a LayerPlan from check_plan", got))
    return PlanDecisions(plan.captured, bool(plan.dense), bool(plan.loop),
                         tuple((str(n), str(k)) for n, k in plan.layout))


def decided_plan(plan: LayerPlan, decisions: PlanDecisions) -> LayerPlan:
    """Return ``plan`` with ``decisions`` made: the plan :func:`check_plan` returned (less its
    probe shapes, see :func:`plan_decisions`), applied with no check and no pass over data.

    Args:
        plan: the unchecked plan of the model the decisions were made for (:func:`layer_plan`).
        decisions: from :func:`plan_decisions`.

    Raises:
        TypeError, ValueError: not a plan and decisions, or decisions naming layers the plan
            does not capture (decisions made for another model).
    """
    func = "decided_plan"
    if not isinstance(plan, LayerPlan):
        raise TypeError(_msg(func, "plan", "a LayerPlan from layer_plan(model)",
                             type(plan).__name__))
    if not isinstance(decisions, PlanDecisions):
        raise TypeError(_msg(func, "decisions", "PlanDecisions from plan_decisions(checked plan)",
                             type(decisions).__name__))
    names = tuple(decisions.layers)
    laid = {n for n, _ in decisions.layout}
    # decisions saved before norms were captured name no norm: those then take vmap(grad)
    base = plan if names == plan.captured else None
    if base is None and names and set(names) <= set(plan.captured):
        base = _plan_of(plan.model, list(names))
    if base is None or not laid <= set(base.layers):
        raise ValueError(_msg(func, "decisions", f"decisions about layers among the plan's "
                              f"{list(plan.captured)}", f"layers {list(names)}, layout of "
                              f"{sorted(laid)}", "They were made for another model."))
    return base._replace(checked=True, dense=bool(decisions.dense), loop=bool(decisions.loop),
                         layout=tuple(decisions.layout), shapes=(), tie_factors=plan.tie_factors)


def keep_tie_factors(plan: LayerPlan) -> LayerPlan:
    """Return ``plan`` with its ties kept as factors (:attr:`LayerPlan.tie_factors`): for a
    consumer that reads them through a Kronecker projection, never as ``[B, V D]`` rows."""
    return plan._replace(tie_factors=True) if plan.ties and not plan.tie_factors else plan
