"""The capture engine's TorchFunctionMode: the per-call bookkeeping of one forward (:mod:`.capture`).

:class:`_Capture` sees every torch call of a forward run by :func:`.capture.tap`, recognises a
selected layer's weight by identity, records that call's layer input and gives its output a
probe; :func:`_acts` lays the records out as ``{layer: a}`` and lists the problems. The call
kinds live in :mod:`.capture_kinds`, the LayerNorm kind and broadcast embeddings in
:mod:`.capture_norm`. All names are importable from :mod:`.capture` as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .capture_kinds import _ADDED, _CALLS, _PER_CALL
from .capture_norm import Broadcast, hold, watched_call
from .capture_specs import NOT_ROWS, CaptureError, LayerSpec

_ROW_READS = frozenset({"bare", "embedding"})  # the call kinds that read a bare weight's rows
# the adds through which a bare weight itself (all its rows) reaches the batch; the in-place
# ones only with the weight as their second operand (watched_call refuses it as the first)
_WHOLE = frozenset({Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add, Tensor.__sub__,
                    Tensor.__rsub__, Tensor.sub, torch.sub, Tensor.__iadd__, Tensor.add_,
                    Tensor.__isub__, Tensor.sub_})
_BENIGN_GETTERS = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda",
                             "layout", "is_sparse", "is_quantized", "is_meta", "names"})
_BENIGN_METHODS = frozenset({"size", "dim", "numel", "__len__", "is_floating_point",
                             "is_complex", "stride", "element_size", "get_device",
                             "is_contiguous", "ndimension", "nelement", "data_ptr",
                             "storage_offset", "__hash__", "__format__", "__repr__"})


def _benign(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") in _BENIGN_GETTERS
    return name in _BENIGN_METHODS


def _name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    return name



class OneTensor(str):
    """A :func:`_one_tensor` sentence: it names every layer given it, so the plan's warning
    gives it once (review RF2 LOW-1: a substring test of the names dropped short names such as
    "1" and "3", found among a shape's digits, from other sentences)."""


def _one_tensor(users: list[tuple[str, str]], then: str, kinds: list[str] | None = None) -> str:
    """One sentence naming every layer that reads one tensor (a tie of three or more), the same
    for each of them (the plan's warning then gives it once: :class:`OneTensor`)."""
    same = len({r for _, r in users}) == 1
    names = [(n or "<root>") + (f" ({kinds[i]})" if kinds else "") + ("" if same else f"'s {r}")
             for i, (n, r) in enumerate(users)]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    what = f"their {users[0][1]} is one tensor" if same else "one tensor is"
    return OneTensor(f"{what} read by the layers {listed} (shared or tied), {then}")


class _Record(NamedTuple):
    a: Tensor  # [B, T, in] (or [B, T] indices); [B, in] (or [B]) when flat
    flat: bool  # the call's input was [B, in] / [B]


class _Capture(TorchFunctionMode):
    """Records selected layers' inputs and adds their probes (see :mod:`.capture`)."""

    def __init__(self, specs: Mapping[str, LayerSpec], state: Mapping[str, Tensor],
                 probes: Mapping[str, Tensor] | None, batch: int | None, tied: bool = False,
                 keyed: Sequence[tuple[str, str, str]] | None = None):
        super().__init__()
        self.specs, self.probes, self.batch = specs, probes, batch
        if keyed is None:
            keyed = _keyed(specs)
        self.problems: dict[str, str] = {}
        self.group: dict[str, tuple[str, ...]] = {}
        self.by_kind: dict[str, dict[int, tuple[str, str]]] = {}
        self.roles = {id(state[k]): (n, role) for k, n, role in keyed}
        if len(self.roles) < len(keyed):  # one tensor under two roles: sharing or tying
            self._shared(specs, state, keyed, tied)
        self.base = self.roles
        self.records: dict[str, list[_Record]] = {n: [] for n in specs}
        # outputs of Embedding calls shared by the batch, and of flat ones (capture_norm)
        self.pending: dict[int, object] = {}
        self.watch: dict[int, tuple[str, Tensor, bool]] = {}
        self.offsets = dict.fromkeys(specs, 0)
        self.made: dict[str, list[Tensor]] = {n: [] for n in specs}
        self.versions: list[tuple[Tensor, int]] = []
        self.rows_read: set[str] = set()  # the bare weights this forward read by rows

    def _shared(self, specs, state, keyed, tied: bool) -> None:
        """The roles of tensors read by several selected layers (problems, or tied groups)."""
        self.roles = {}
        users: dict[int, list[tuple[str, str]]] = {}  # a tensor -> (layer, role) reading it
        for key, n, role in keyed:
            self.roles.setdefault(id(state[key]), (n, role))
            if all(m != n for m, _ in users.setdefault(id(state[key]), [])):
                users[id(state[key])].append((n, role))
        shared: dict[int, list[str]] = {}  # a tied weight -> the layers reading it as weight
        for t, us in users.items():
            if len(us) < 2:
                continue
            if tied and all(r == "weight" for _, r in us):
                shared[t] = [n for n, _ in us]
            elif len(us) == 2:  # one tensor, two layers: neither factor is the layer's own
                (a, ra), (b, rb) = us
                self.problems.setdefault(a, f"shares its {ra} with layer {b}"
                                            + ("" if ra == rb else f" (its {rb})"))
                self.problems.setdefault(b, f"shares its {rb} with layer {a}"
                                            + ("" if ra == rb else f" (its {ra})"))
            else:  # T5's shared: one sentence naming every user (review RU5 L3)
                for n, _ in us:
                    self.problems.setdefault(n, _one_tensor(us, "so no one layer's factors "
                                                                "give its gradient"))
        # A tied weight (tied=True) is attributed call by call to the member of the call's
        # kind: F.embedding to the Embedding, F.linear to the Linear. Two members of one kind
        # could not be told apart, so they stay problems.
        for t, members in shared.items():
            kinds = [specs[m].kind for m in members]
            if len(set(kinds)) < len(kinds):
                why = _one_tensor([(m, "weight") for m in members], "of which a tie is factored "
                                  "only with one layer of each kind", kinds)
                for m in members:
                    self.problems.setdefault(m, why)
                continue
            for m, k in zip(members, kinds, strict=True):
                self.group[m] = tuple(members)
                self.by_kind.setdefault(k, dict(self.roles))[t] = (m, "weight")

    def _hits(self, args, kwargs) -> list[tuple[str, str]]:
        # Looked up by id without a type test first: the selected tensors stay alive for the
        # whole forward (state holds them), so no other live object can share their ids.
        roles, out = self.roles, []
        for x in (*args, *kwargs.values()) if kwargs else args:
            role = roles.get(id(x))
            if role is not None:
                out.append(role)
            elif isinstance(x, (list, tuple)):
                out.extend(roles[id(t)] for t in x if id(t) in roles)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if not self.roles:
            return func(*args, **kwargs)
        if self.pending or self.watch:
            done = watched_call(self, func, args, kwargs)
            if done is not self:
                return done
        if self.by_kind:  # a tied weight's reader is the member of this call's kind
            call = _CALLS.get(func)
            self.roles = self.by_kind.get(call[0], self.base) if call else self.base
        hits = self._hits(args, kwargs)
        if not hits or _benign(func):
            return func(*args, **kwargs)
        layers = {n for n, _ in hits}
        name = next(iter(layers))
        if torch.is_inference_mode_enabled():
            # inference tensors are never recorded by autograd, and torch.func cannot run them:
            # neither g nor a dense fallback exists, so no CaptureError (which asks for one)
            raise ValueError(
                f"tap(module=...): expected the selected layers called where autograd can record "
                f"them, got layer {name or '<root>'!r} called under torch.inference_mode(). Run a "
                f"frozen part under torch.no_grad() instead (its layers then get zero gradients).")
        call = _CALLS.get(func)
        why = None
        kind = self.specs[name].kind
        # a bare weight's rows are read by indexing it or by F.embedding(ids, W)
        if kind == "bare" and call is not None and call[0] in _ROW_READS:
            self.rows_read.add(name)
            kind = call[0]
        elif kind == "bare" and call is None and len(hits) == 1 and func in _WHOLE and \
                self._whole_operand(name, args) is not None:
            return self._whole(name, func, args, kwargs)
        if len(layers) > 1:
            why = f"shares a {_name(func)} call with layer(s) {sorted(layers - {name})}"
        elif call is None or call[0] != kind:
            why = f"its tensors are used by {_name(func)}"
        if why is None:
            why = call[1](self, name, args, kwargs)
        if isinstance(why, str):  # a tied weight's misuse is every member's problem
            for layer in sorted(layers):
                for n in self.group.get(layer, (layer,)):
                    self.problems.setdefault(n, why if n in layers else
                                             f"tied to layer {layer!r} ({why})")
            return func(*args, **kwargs)
        if isinstance(why, Broadcast):
            return hold(self, name, func(*args, **kwargs), why.idx)
        a, flat, T = why
        if self.probes is _PER_CALL and flat and call[0] in _GRAPHED and torch.is_grad_enabled():
            args, kwargs = _graphed(self, name, args, kwargs)
        out = func(*args, **kwargs)
        self.records[name].append(_Record(a, flat))
        out = call[2](self, name, out, T)
        if call[0] in ("embedding", "bare"):
            # ids batch-first by shape alone (shared [T, T] ids at B == T look so too): their
            # rows are one per example only if no binary op broadcasts them (capture_norm)
            self.watch[id(out)] = (name, out, flat)
        return out

    def _whole_operand(self, name: str, args) -> int | None:
        """The position of bare weight ``name`` in a two-operand add whose other operand is a
        batch-first tensor, else None (``w + 1.0``, ``1 + w``: not a row read, review R7 F4)."""
        if len(args) < 2:
            return None
        for j, t in enumerate(args[:2]):
            o = args[1 - j]
            if self.roles.get(id(t)) == (name, "weight") and isinstance(o, Tensor) and o.ndim \
                    and self.batch is not None and o.shape[0] == self.batch:
                return j
        return None

    def _whole(self, name: str, func, args, kwargs):
        """``x + W`` (``W - x``, ``x += W``, ...) of a bare weight ``W`` itself with a batch-first
        ``x``: all its rows read (``W[:]``, ids ``0..V-1``) and used by this add, as a row read
        (:mod:`.capture_norm`)."""
        i = self._whole_operand(name, args)
        w = args[i]
        self.rows_read.add(name)
        rows = w[:]  # a view of its own (the mode is off inside its handler): held until used
        hold(self, name, rows, torch.arange(w.shape[0], device=w.device))
        return watched_call(self, func, (*args[:i], rows, *args[i + 1:]), kwargs)

    def _own(self, name: str, out: Tensor) -> Tensor:
        """A probe made per call that is the call's output itself: autograd's gradient w.r.t.
        it is ``dL/dout`` with no zero added (no add in the forward, none in the backward).

        Under grad mode, a flat Linear call with no input that requires grad (the first
        selected layer, parameters without gradient) was given a graph beforehand
        (:func:`_graphed`). An output still without one (any other kind's there, or a frozen
        part run under ``torch.no_grad``) gets an added zero probe, made with grad enabled:
        made a leaf, an output computed under no_grad would get a gradient its weights do not
        have (review R4), and a leaf held by autograd stays alive through the backward. Every
        other output's version is checked after the forward, since after an in-place op its
        gradient would be the modified tensor's."""
        if not out.requires_grad:
            with torch.enable_grad():
                p = out.new_zeros((), requires_grad=True).expand(out.shape)
            self.made[name].append(p)
            return out + p  # under no_grad: off the graph, so g = 0
        self.versions.append((out, out._version))
        self.made[name].append(out)
        return out

    def _probe(self, name: str, T: int, out: Tensor | None = None) -> Tensor | None:
        """The slice of ``probes[name]`` for this call's ``T`` positions (None: no probes), or,
        for probes made per call, a new zero probe of ``out``'s shape."""
        if self.probes is None:
            return None
        if self.probes is _PER_CALL or self.probes is _ADDED:
            # zero-stride: no memory; its gradient is the call's dL/dout whatever the layout
            # (made with grad enabled: under a model's no_grad it has a grad_fn all the same)
            with torch.enable_grad():
                p = out.new_zeros((), requires_grad=True).expand(out.shape)
            self.made[name].append(p)
            return p
        p = self.probes[name]
        if p.ndim == 0:
            return p
        if p.ndim == 2:
            if T != 1 or self.offsets[name]:
                raise CaptureError({name: "a flat probe [B, out] for a layer with several "
                                          "positions or calls; build probes from probe_shapes"})
            self.offsets[name] = 1
            return p
        off = self.offsets[name]
        self.offsets[name] = off + T
        return p[:, off:off + T]

    def rows_of(self, x: Tensor) -> int | str:
        """``B`` when ``x`` is batch-first, else the reason it is not."""
        if self.batch is None or x.ndim == 0 or x.shape[0] != self.batch:
            got = list(x.shape) if x.ndim else "a scalar"
            return f"an input {got} that is not batch-first (B = {self.batch})"
        return self.batch


# Kinds given a graph by their weight's alias: only a flat Linear, whose kernel does not depend
# on grad mode and whose node saves only its input (``a`` itself) besides the weight. Its output
# is then held until the forward ends, as every probe that is an output is; on the digits tasks
# the pass's tensor peak is unchanged (0.063 / 0.222 MiB). Left out, with the added zero probe:
# Embedding (text-lm's pass peaked 6.05 -> 6.30 MiB: its [B, T, D] output held through the
# forward), Conv2d (digits-cnn 15.47 -> 16.00 MiB for 2% time), Conv1D (not measured), a Linear
# on [B, T, in] (matmul may fold another way once the weight requires grad: g moved by
# 5.6e-17) and LayerNorm (its node would save its input besides ``a`` = xhat).
_GRAPHED = frozenset({"linear"})


def _graphed(mode: _Capture, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with ``name``'s weight replaced by a detached alias that requires grad
    when no tensor argument requires grad or is an inference tensor, else unchanged.

    The call then computes the same values (the same kernel on the same tensors) with a graph,
    so its output is its own probe: autograd's gradient at the output's edge is ``dL/dout``,
    and the node itself never runs (only gradients up to the edges are taken). That saves the
    added zero probe's ``new_zeros``, ``expand`` and add (about 30 us a pass on digits-lr)."""
    # an inference tensor (a backbone run under torch.inference_mode, or an inference weight)
    # cannot be saved for backward, which the alias's node would do: the zero probe saves none
    if any(isinstance(t, Tensor) and (t.requires_grad or t.is_inference())
           for t in (*args, *kwargs.values())):
        return args, kwargs
    key, roles = (name, "weight"), mode.roles
    args = tuple(t.detach().requires_grad_() if roles.get(id(t)) == key else t for t in args)
    if kwargs:
        kwargs = {k: t.detach().requires_grad_() if roles.get(id(t)) == key else t
                  for k, t in kwargs.items()}
    return args, kwargs


def _keyed(specs: Mapping[str, LayerSpec]) -> tuple[tuple[str, str, str], ...]:
    """``(state key, layer, role)`` of every selected weight and bias, in layer order."""
    return tuple((key, n, role) for n, s in specs.items()
                 for role, key in (("weight", s.weight), ("bias", s.bias)) if key is not None)


def _batch_rows(args, kwargs) -> int | None:
    """The first input leaf's leading size (``B``), None without one."""
    if args and isinstance(args[0], Tensor) and args[0].ndim:  # the usual (x, ...) call
        return args[0].shape[0]
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, Tensor) and t.ndim:
            return t.shape[0]
    return None


def _acts(mode: _Capture) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Return ``({layer: a}, problems)`` from a finished mode (:mod:`.capture`'s shapes)."""
    acts, problems = {}, dict(mode.problems)
    for n, recs in mode.records.items():
        if n in problems:
            if mode.specs[n].kind == "bare" and n not in mode.rows_read:
                problems[n] = f"{NOT_ROWS} ({problems[n]})"
            continue
        if not recs:
            problems[n] = (f"{NOT_ROWS} (not used in this forward)"
                           if mode.specs[n].kind == "bare" and n not in mode.rows_read else
                           "not called in this forward (or its weight reached a call as a copy)")
        elif len(recs) == 1:  # the call's own input (or a view of it): no copy
            acts[n] = recs[0].a
        else:
            acts[n] = torch.cat([r.a[:, None] if r.flat else r.a for r in recs], 1)
    return acts, problems
