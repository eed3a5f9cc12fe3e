"""Record what optimizer-aware attribution needs from the user's OWN training loop.

No hook touches the user's model or optimizer: the loop hands its state to a pure function
and gets the grown record back, explicit state in and out::

    rec = start_record("adamw", checkpoint_every=50, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for t, rows in enumerate(order):
        rec = record_step(rec, rows, lr=lr(t), params=params, opt_state=opt_state)  # state BEFORE t
        params, opt_state = step(params, opt_state, take(data, rows), ones)
    record = finish_record(rec, params=params, opt_state=opt_state)             # a Record
    dattri_fn.io.save(record, "run.rec")                                         # atomic

A plain ``torch.optim`` loop passes ``dict(model.named_parameters())`` and the optimizer itself
as ``opt_state`` (its ``state[p]["exp_avg"]``/``["exp_avg_sq"]``/``["step"]`` are read, never
written); :func:`start_record` also takes the optimizer to read its hyper-parameters.

Per step the record keeps the rows of the batch (the data order) and the learning rate; at the
checkpoint steps (``t % checkpoint_every == 0``, or ``t in checkpoint_steps``) a detached copy
of the parameters and, for Adam/AdamW, the moments ``(count, m, v)``; the final state always.
With ``grads=`` (:class:`GradSpec`) it also writes each step's per-example (projected) gradients
at the step's parameters into a :mod:`dattri_fn.store` feature store, one store per step, or
(``steps_per_shard=k``, append mode) one grouped shard per ``k`` steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .._checks import _msg, check_int, check_optional_int, check_params
from .._types import Batch, Params
from .steps import AdamState, SGDState

OPTIMIZERS = ("sgd", "adam", "adamw")


class Moments(NamedTuple):
    """Adam moments after ``count`` steps: ``mu`` (first), ``nu`` (second), as torch keeps them
    (no bias correction), with the ``betas`` and ``eps`` that produced them."""

    count: int
    mu: Params
    nu: Params
    betas: tuple[float, float]
    eps: float


class Checkpoint(NamedTuple):
    """The state before step ``step`` (``step == T``: the final state): ``params`` and, for
    Adam/AdamW, its :class:`Moments` (None for SGD)."""

    step: int
    params: Params
    moments: Moments | None


class GradSpec(NamedTuple):
    """Per-step per-example gradients to store: ``loss(params, example)``, an optional random
    projection (``proj_dim``, ``seed``, ``kind``) and the directory of the stores.

    ``steps_per_shard``: None writes one store per step (``<path>/step-T``: four atomic writes,
    eight fsyncs, a step). ``k`` appends instead: the rows of ``k`` consecutive steps are kept
    in memory and written as ONE shard of a grouped store (``<path>/steps-T0``, two atomic
    writes for the ``k`` steps; :func:`dattri_fn.store.write_grouped`); step ``t``'s entry in
    ``Record.grad_stores`` is then ``<path>/steps-T0/step-T``, which ``open_store`` reads
    alone. A run killed at any moment and run again (the same loop) re-reads every committed
    group, checking each step's params and batch hashes, computes nothing for it, and resumes
    at the first uncommitted group: the groups are then byte for byte those of an
    uninterrupted run. The last group is written by :func:`finish_record`; up to ``k`` steps
    of rows are held in memory.
    """

    loss: Callable
    path: str
    proj_dim: int | None = None
    seed: int = 0
    kind: str = "rademacher"
    steps_per_shard: int | None = None


class Recording(NamedTuple):
    """A record in progress (immutable: :func:`record_step` returns a new one)."""

    optimizer: dict
    every: int | None
    at_steps: frozenset
    order: tuple[Tensor, ...]
    lrs: tuple[float, ...]
    checkpoints: tuple[Checkpoint, ...]
    grads: GradSpec | None
    grad_stores: tuple[str, ...]
    # append mode: (name, rows, data_hash, params_hash) of the steps not yet written
    pending: tuple = ()


class Record(NamedTuple):
    """A finished record of ``T`` steps.

    Fields:
        optimizer: ``{"name", "betas", "eps", "momentum", "weight_decay"}`` (JSON values).
        order: ``T`` int64 index tensors, the rows step ``t`` read.
        lrs: ``[T]`` float64, the learning rate step ``t`` used.
        checkpoints: :class:`Checkpoint` s in step order; the last is the final state (step T).
        grad_stores: per step, the directory of its per-example gradient store (or empty).
    """

    optimizer: dict
    order: tuple[Tensor, ...]
    lrs: Tensor
    checkpoints: tuple[Checkpoint, ...]
    grad_stores: tuple[str, ...]

    @property
    def steps(self) -> int:
        return len(self.order)

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]


def _hparams_from_torch(opt: torch.optim.Optimizer) -> dict:
    kind = type(opt).__name__.lower()
    if kind not in OPTIMIZERS:
        raise TypeError(_msg("start_record", "optimizer", "'sgd', 'adam', 'adamw' or a "
                             "torch.optim.SGD/Adam/AdamW", type(opt).__name__))
    group = opt.param_groups[0]
    if kind != "sgd" and (group.get("amsgrad") or group.get("maximize")):
        raise ValueError(_msg("start_record", "optimizer", "Adam/AdamW without amsgrad/maximize",
                              "amsgrad or maximize set"))
    if kind == "sgd" and (group.get("nesterov") or group.get("dampening")):
        raise ValueError(_msg("start_record", "optimizer", "SGD without nesterov/dampening",
                              "nesterov or dampening set"))
    return {"name": kind, "betas": list(group.get("betas", (0.9, 0.999))),
            "eps": float(group.get("eps", 1e-8)), "momentum": float(group.get("momentum", 0.0)),
            "weight_decay": float(group.get("weight_decay", 0.0))}


def start_record(optimizer: str | torch.optim.Optimizer, *, checkpoint_every: int | None = None,
                 checkpoint_steps: Iterable[int] = (), betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0,
                 grads: GradSpec | None = None) -> Recording:
    """Return an empty :class:`Recording` for a run of ``optimizer``.

    Args:
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, or a ``torch.optim`` SGD/Adam/AdamW whose
            first param group's hyper-parameters are read (the keywords below are then ignored).
        checkpoint_every: keep the state before every ``k``-th step (steps 0, k, 2k...).
        checkpoint_steps: keep the state before these steps too.
        betas, eps: Adam's; momentum: SGD's heavy-ball ``mu``; weight_decay: coupled for
            sgd/adam, decoupled for adamw (as the library's and torch's optimizers).
        grads: store each step's per-example gradients (see :class:`GradSpec`).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        hp = _hparams_from_torch(optimizer)
    elif isinstance(optimizer, str) and optimizer in OPTIMIZERS:
        hp = {"name": optimizer, "betas": [float(betas[0]), float(betas[1])], "eps": float(eps),
              "momentum": float(momentum), "weight_decay": float(weight_decay)}
    else:
        raise TypeError(_msg("start_record", "optimizer", "'sgd', 'adam', 'adamw' or a "
                             "torch.optim.SGD/Adam/AdamW", repr(optimizer)))
    every = check_optional_int("start_record", "checkpoint_every", checkpoint_every)
    steps = frozenset(check_int("start_record", "checkpoint_steps", s, minimum=0)
                      for s in checkpoint_steps)
    if grads is not None and not isinstance(grads, GradSpec):
        raise TypeError(_msg("start_record", "grads", "a GradSpec or None", type(grads).__name__))
    if grads is not None:
        check_optional_int("start_record", "grads.steps_per_shard", grads.steps_per_shard)
    return Recording(hp, every, steps, (), (), (), grads, ())


def _clone(params: Params) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}


def _moments(func: str, rec: Recording, params: Params, opt_state) -> Moments | None:
    hp = rec.optimizer
    if hp["name"] == "sgd":
        if opt_state is not None and not isinstance(opt_state, (SGDState, torch.optim.SGD)):
            raise TypeError(_msg(func, "opt_state", "an SGDState, a torch.optim.SGD or None",
                                 type(opt_state).__name__))
        return None
    betas, eps = (float(hp["betas"][0]), float(hp["betas"][1])), float(hp["eps"])
    if isinstance(opt_state, AdamState):
        if set(opt_state.mu) != set(params):
            raise ValueError(_msg(func, "opt_state", f"moments for the keys {list(params)}",
                                  f"{list(opt_state.mu)}"))
        return Moments(int(opt_state.count), _clone(opt_state.mu), _clone(opt_state.nu), betas, eps)
    if isinstance(opt_state, (torch.optim.Adam, torch.optim.AdamW)):
        mu, nu, counts = {}, {}, set()
        for name, p in params.items():
            st = opt_state.state.get(p, {})
            if not st:  # torch creates the state at the first step
                mu[name], nu[name] = torch.zeros_like(p.detach()), torch.zeros_like(p.detach())
                counts.add(0)
                continue
            mu[name], nu[name] = st["exp_avg"].detach().clone(), st["exp_avg_sq"].detach().clone()
            counts.add(int(st["step"]))
        if len(counts) != 1:
            raise ValueError(_msg(func, "opt_state", "one step count for every parameter",
                                  f"counts {sorted(counts)}",
                                  "Pass params as dict(model.named_parameters()) of the "
                                  "parameters the optimizer updates."))
        return Moments(counts.pop(), mu, nu, betas, eps)
    raise TypeError(_msg(func, "opt_state", f"the {hp['name']} state at a checkpoint step (an "
                         "AdamState or the torch.optim optimizer)", type(opt_state).__name__))


def _grad_features(spec: GradSpec, params: Params) -> Callable:
    """``batch -> [B, d]``: per-example gradients at ``params``, projected if asked."""
    from ..transforms.grad import Refuse, per_sample_grad_unchecked
    from ..tree import ravel_batched

    proj = None
    if spec.proj_dim is not None:
        from ..transforms.project import make_projector

        v0 = next(iter(params.values()))
        P = sum(v.numel() for v in params.values())
        proj = make_projector(P, proj_dim=spec.proj_dim, kind=spec.kind, seed=spec.seed,
                              dtype=v0.dtype, packed=False)

    def features(b):
        G = ravel_batched(per_sample_grad_unchecked(  # [B, P]; vmapped for every model
            spec.loss, params, b, refuse=Refuse("GradSpec", "loss", capture=False)))
        return G if proj is None else proj(G)

    return features


def _grads_config(spec: GradSpec) -> dict:
    return {"kind": "record-grads", "proj_dim": spec.proj_dim, "seed": spec.seed,
            "projection": spec.kind, "steps_per_shard": spec.steps_per_shard}


def _group_dir(spec: GradSpec, t: int) -> str:
    k = spec.steps_per_shard
    return os.path.join(spec.path, f"steps-{t - t % k:07d}")


def _append_grads(func: str, rec: Recording, t: int, params: Params, batch: Batch):
    """Append mode: ``(entry path, pending)`` for step ``t``; the group is written when full."""
    from .._checks import blame_data
    from ..store import batch_hash, grouped_parts, params_hash, write_grouped

    spec = rec.grads
    group, name = _group_dir(spec, t), f"step-{t:07d}"
    p_hash, d_hash = params_hash(params, func=func), batch_hash(batch)
    # A group being filled by this run is not committed; only a fresh one is looked up.
    table = grouped_parts(group) if not rec.pending else None
    if table is not None:
        entry = table.get(name)
        if entry is None:
            raise ValueError(_msg(func, "rec", f"step {t} in the committed group {group!r}",
                                  f"a group of steps {sorted(table)}", "The run is not the one "
                                  "recorded there; record into a new path."))
        for field, arg, have in (("params_hash", "params", p_hash), ("data_hash", "batch", d_hash)):
            if entry[field] != have:
                raise ValueError(_msg(func, arg, f"step {t}'s {arg} as recorded in {group!r} "
                                      f"({field} {entry[field][:12]})", f"{have[:12]}",
                                      "The run is not the one recorded there; record into a "
                                      "new path."))
        return os.path.join(group, name), ()
    with blame_data(func, "batch", batch):
        feats = _grad_features(spec, params)(batch)
    arr = np.ascontiguousarray(feats.detach().cpu().numpy())
    pending = rec.pending + ((name, arr, d_hash, p_hash),)
    if len(pending) == spec.steps_per_shard:
        write_grouped(group, pending, config=_grads_config(spec), func=func)
        pending = ()
    return os.path.join(group, name), pending


def _grad_store(rec: Recording, t: int, params: Params, batch: Batch) -> str:
    from ..store import build_store

    spec = rec.grads
    path = os.path.join(spec.path, f"step-{t:07d}")
    config = {"kind": "record-grads", "step": t, "proj_dim": spec.proj_dim, "seed": spec.seed,
              "projection": spec.kind}
    build_store(path, _grad_features(spec, params), batch, params=params, config=config,
                func="record_step")
    return path


def record_step(rec: Recording, rows: Tensor, *, lr: float, params: Params | None = None,
                opt_state=None, batch: Batch | None = None) -> Recording:
    """Return ``rec`` with step ``t = len(rec.order)`` appended: its ``rows`` and ``lr``.

    Call it BEFORE the step, with the state the step starts from. At a checkpoint step
    ``params`` (and for Adam/AdamW ``opt_state``) are required and copied (detached); at other
    steps they are not read, unless ``rec`` stores gradients (then ``params`` and ``batch``, the
    rows' examples, are needed at every step).

    Args:
        rec: the recording so far.
        rows: ``[B]`` int64 indices of the training examples in the step's batch.
        lr: the learning rate the step uses.
        params: ``{name: tensor}`` before the step (e.g. ``dict(model.named_parameters())``).
        opt_state: an :class:`~dattri_fn.training.AdamState` / ``SGDState`` or the
            ``torch.optim`` optimizer (read only).
        batch: the step's examples, for the gradient store.
    """
    func = "record_step"
    if not isinstance(rec, Recording):
        raise TypeError(_msg(func, "rec", "a Recording from start_record", type(rec).__name__))
    if not isinstance(rows, Tensor) or rows.ndim != 1 or rows.is_floating_point():
        raise ValueError(_msg(func, "rows", "a 1-d integer index tensor",
                              repr(getattr(rows, "shape", type(rows).__name__))))
    if isinstance(lr, Tensor) and lr.numel() == 1:  # a tensor learning rate of a torch.optim group
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(_msg(func, "lr", "a finite float >= 0", repr(lr)))
    t = len(rec.order)
    checkpoints, stores = rec.checkpoints, rec.grad_stores
    if (rec.every is not None and t % rec.every == 0) or t in rec.at_steps:
        if params is None:
            raise ValueError(_msg(func, "params", f"the params at checkpoint step {t}", "None"))
        params = check_params(func, "params", params)
        checkpoints = checkpoints + (Checkpoint(t, _clone(params),
                                                _moments(func, rec, params, opt_state)),)
    if rec.grads is not None:
        if params is None or batch is None:
            raise ValueError(_msg(func, "batch", "params and batch at every step (the record "
                                  "stores per-example gradients)", "None"))
        params = {k: v.detach() for k, v in check_params(func, "params", params).items()}
        if rec.grads.steps_per_shard is None:
            stores = stores + (_grad_store(rec, t, params, batch),)
        else:
            entry, pending = _append_grads(func, rec, t, params, batch)
            stores = stores + (entry,)
            rec = rec._replace(pending=pending)
    return rec._replace(order=rec.order + (rows.detach().to("cpu", torch.int64).clone(),),
                        lrs=rec.lrs + (float(lr),), checkpoints=checkpoints, grad_stores=stores)


def finish_record(rec: Recording, *, params: Params, opt_state=None) -> Record:
    """Return the finished :class:`Record`, with the final state (step ``T``) as last checkpoint."""
    func = "finish_record"
    if not isinstance(rec, Recording):
        raise TypeError(_msg(func, "rec", "a Recording from start_record", type(rec).__name__))
    if not rec.order:
        raise ValueError(_msg(func, "rec", "at least one recorded step", "none"))
    params = check_params(func, "params", params)
    final = Checkpoint(len(rec.order), _clone(params), _moments(func, rec, params, opt_state))
    if rec.pending:  # append mode: the last, partial group of steps
        from ..store import write_grouped

        first = int(rec.pending[0][0].removeprefix("step-"))
        write_grouped(_group_dir(rec.grads, first), rec.pending, config=_grads_config(rec.grads),
                      func=func)
    return Record(dict(rec.optimizer), rec.order, torch.tensor(rec.lrs, dtype=torch.float64),
                  rec.checkpoints + (final,), rec.grad_stores)


def record_trajectory(trajectory, order, *, lr, optimizer: str, betas: tuple[float, float] = (0.9, 0.999),
                      eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0) -> Record:
    """Return the :class:`Record` of a run made by :func:`~dattri_fn.training.train`.

    ``trajectory.checkpoints`` become the record's checkpoints (the final one at ``T``);
    ``order`` is the run's data order and ``lr`` its learning rate (a float or the schedule
    ``count -> lr`` the optimizer was built with); the keywords are the optimizer's settings, as
    in :func:`start_record`.
    """
    from .run import Trajectory

    func = "record_trajectory"
    if not isinstance(trajectory, Trajectory):
        raise TypeError(_msg(func, "trajectory", "a Trajectory from train(...)",
                             type(trajectory).__name__))
    sched = lr if callable(lr) else (lambda t: lr)
    rec = start_record(optimizer, checkpoint_steps=[s for s in trajectory.checkpoints
                                                    if s < len(order)],
                       betas=betas, eps=eps, momentum=momentum, weight_decay=weight_decay)
    for t, rows in enumerate(order):
        params, state = trajectory.checkpoints.get(t, (None, None))
        rec = record_step(rec, rows, lr=float(sched(t)), params=params, opt_state=state)
    if len(order) not in trajectory.checkpoints:
        raise ValueError(_msg(func, "order", f"the order of the trajectory's run (its final state "
                              f"is at step {max(trajectory.checkpoints)})", f"{len(order)} steps"))
    params, state = trajectory.checkpoints[len(order)]
    return finish_record(rec, params=params, opt_state=state)


def check_record(func: str, record: Any, *, moments: bool = False) -> Record:
    """Return ``record`` validated as a finished :class:`Record` (with Adam moments if asked)."""
    if not isinstance(record, Record):
        raise TypeError(_msg(func, "params", "the Record of the run (finish_record; "
                             "dattri_fn.io.load of a saved one)", type(record).__name__))
    if moments and record.optimizer.get("name") not in ("adam", "adamw"):
        raise ValueError(_msg(func, "params", "a Record of an Adam or AdamW run",
                              f"a {record.optimizer.get('name')!r} run"))
    return record


__all__ = ["Checkpoint", "GradSpec", "Moments", "Record", "Recording", "check_record",
           "finish_record", "record_step", "record_trajectory", "start_record"]
