"""LESS: the cosine between a test gradient and each example's Adam update direction.

From the checkpoints ``c`` of a :class:`~dattri_fn.training.Record` of an Adam/AdamW run (state
``theta_c`` before step ``t_c``, moments ``m_c, v_c`` after ``t_c`` steps, learning rate
``lr_c`` of step ``t_c``):

    Gamma_c(z) = m_hat / (sqrt(v_hat) + eps),
        m_hat = (b1 m_c + (1 - b1) g) / (1 - b1^(t_c+1)),
        v_hat = (b2 v_c + (1 - b2) g^2) / (1 - b2^(t_c+1)),    g = grad loss(theta_c, z)
    scores[i, j] = sum_c lr_c cos(R^T Gamma_c(z_i), R^T grad target(theta_c, z_j))

i.e. the direction the next Adam step would take if ``z_i`` alone made up its batch, compared
with the test gradient; ``R`` an optional random projection (``proj_dim``), applied after
``Gamma`` as LESS does. Positive = the step on ``z_i`` lowers ``z_j``'s loss: a proponent.

The bias corrections scale ``Gamma_c`` by ``sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` outside
``eps``, so with ``eps -> 0`` they leave the cosine unchanged; LESS's released code (no bias
correction, ``eps`` inside the root) differs from the paper's formula above only through ``eps``.
A coupled weight-decay term is not folded into ``g``: it is the same for every example.
``lr_c`` is the rate of step ``t_c`` (TracIn-CP's weight); LESS weights its per-epoch
checkpoints by the epoch's mean rate, a per-checkpoint scale that only matters when the rate
changes between checkpoints.

References:
    Xia, Malladi, Gururangan, Arora & Chen, "LESS: Selecting Influential Data for Targeted
    Instruction Tuning", ICML 2024, arXiv 2402.04333 (Definition of the Adam influence, Sec. 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import _msg, all_finite, check_int, check_optional_int
from .._types import Loss, Params
from ..model import FunctionalModel
from ..training.record import Record, check_record
from ..transforms.grad import Refuse
from .method import Method, loss_and_plan, stacked_per_sample_grad
from .pipeline import feature_method, in_chunks
from .unit_rows import unit_rows  # noqa: F401  (less.unit_rows, as before)


class RecordedCheckpoints(NamedTuple):
    """The checkpoints a method reads from a Record, stacked.  # C checkpoints, P params

    ``stacked {name: [C, *shape]}``, ``lrs [C]``, ``counts [C]`` (Adam steps taken),
    ``mu``/``nu [C, P]`` raveled moments, ``betas``, ``eps``, ``steps`` (their step indices).
    """

    stacked: Params
    lrs: Tensor
    counts: Tensor
    mu: Tensor
    nu: Tensor
    betas: tuple[float, float]
    eps: float
    steps: tuple[int, ...]


def recorded_checkpoints(func: str, record: Record, steps: Sequence[int] | None, *,
                         min_count: int = 0) -> RecordedCheckpoints:
    """Return the Adam checkpoints of ``record`` (before a step: ``step < T``), stacked.

    ``steps`` selects them by step index (None: all with at least ``min_count`` Adam steps).
    """
    record = check_record(func, record, moments=True)
    T = record.steps
    usable = {c.step: c for c in record.checkpoints if c.step < T}
    if steps is None:
        chosen = [c for s, c in sorted(usable.items()) if c.moments.count >= min_count]
    else:
        missing = [s for s in steps if s not in usable]
        if missing:
            raise ValueError(_msg(func, "checkpoints", f"steps among the record's checkpoints "
                                  f"before T = {T}: {sorted(usable)}", f"{missing}"))
        chosen = [usable[s] for s in steps]
        low = [c.step for c in chosen if c.moments.count < min_count]
        if low:
            raise ValueError(_msg(func, "checkpoints", f"checkpoints with >= {min_count} Adam "
                                  "steps taken (the second moment is 0 before the first)",
                                  f"steps {low}"))
    if not chosen:
        raise ValueError(_msg(func, "params", f"a Record with a checkpoint before T = {T} "
                              f"(and >= {min_count} Adam steps taken)", "none",
                              "Record with checkpoint_every or checkpoint_steps."))
    keys = list(chosen[0].params)
    flat = lambda tree: torch.cat([tree[k].reshape(-1) for k in keys])  # noqa: E731
    stacked = {k: torch.stack([c.params[k] for c in chosen]) for k in keys}
    v0 = stacked[keys[0]]
    m0 = chosen[0].moments
    return RecordedCheckpoints(
        stacked, record.lrs[[c.step for c in chosen]].to(v0.dtype).to(v0.device),
        torch.tensor([c.moments.count for c in chosen], dtype=v0.dtype, device=v0.device),
        torch.stack([flat(c.moments.mu) for c in chosen]),
        torch.stack([flat(c.moments.nu) for c in chosen]),
        (float(m0.betas[0]), float(m0.betas[1])), float(m0.eps), tuple(c.step for c in chosen))


def _projector(P: int, proj_dim, kind, seed, like: Tensor):
    if proj_dim is None:
        return None
    from ..transforms.project import make_projector

    return make_projector(P, proj_dim=proj_dim, kind=kind, seed=seed, dtype=like.dtype,
                          device=like.device, packed=False)


def optimizer_method(name: str, loss: Loss | FunctionalModel, train_map: Callable, *,
                     target=None, checkpoints=None, normalize: bool, min_count: int,
                     proj_dim=None, kind="rademacher", seed=0, chunk_size=None) -> Method:
    """A Method over a Record: ``scores = sum_c <lr_c u_c(z_i), w_c(z_j)>`` with
    ``u_c = R^T train_map(G_c, ckpts)`` and ``w_c = R^T grad target``, both unit rows if
    ``normalize``.  ``train_map(G [C, B, P], ckpts) -> [C, B, P]``."""
    check_optional_int(name, "proj_dim", proj_dim)
    check_optional_int(name, "chunk_size", chunk_size)
    check_int(name, "seed", seed, minimum=0)
    # every model is vmapped here (no capture plan): a refusal names the argument to rewrite
    train_refuse = Refuse(name, "loss", capture=False)
    test_refuse = Refuse(name, "loss" if target is None else "target", capture=False)
    loss, _ = loss_and_plan(name, "loss", loss)
    target = loss if target is None else loss_and_plan(name, "target", target)[0]
    steps = None if checkpoints is None else [check_int(name, "checkpoints", s, minimum=0)
                                              for s in checkpoints]

    def features(record):
        ck = recorded_checkpoints(name, record, steps, min_count=min_count)
        C, P = ck.mu.shape
        proj = _projector(P, proj_dim, kind, seed, ck.mu)

        def finish(G: Tensor) -> Tensor:  # [C, B, P] -> [C, B, F]
            if proj is not None:
                G = proj(G.reshape(-1, P)).reshape(C, G.shape[1], -1)
            return unit_rows(G) if normalize else G

        def train_f(batch) -> Tensor:
            G = stacked_per_sample_grad(loss, ck.stacked, batch, refuse=train_refuse)  # [C, B, P]
            return finish(train_map(G, ck)) * ck.lrs[:, None, None]

        def test_f(batch) -> Tensor:
            return finish(stacked_per_sample_grad(target, ck.stacked, batch, refuse=test_refuse))

        device = ck.mu.device
        return in_chunks(train_f, chunk_size), in_chunks(test_f, chunk_size), device

    return feature_method(name, features, lambda params: recorded_checkpoints(
        name, params, steps, min_count=min_count))


def adam_direction(G: Tensor, ck: RecordedCheckpoints) -> Tensor:
    """Return ``Gamma_c(g)`` for every row: the bias-corrected Adam step from the recorded
    moments updated with ``g`` alone.  # [C, B, P] -> [C, B, P]"""
    b1, b2 = ck.betas
    t = (ck.counts + 1)[:, None, None]
    m = (b1 * ck.mu[:, None] + (1 - b1) * G) / (1 - b1 ** t)
    v = (b2 * ck.nu[:, None] + (1 - b2) * G * G) / (1 - b2 ** t)
    finite = all_finite(v)
    den = v.sqrt_().add_(ck.eps)  # in place: m and v are this call's own temporaries
    out = m.div_(den)  # the same values as m / (v.sqrt() + eps), two allocations fewer
    if finite:
        return out
    # g^2 overflowed (a gradient entry ~1e20 in float32): v = inf made the entry 0, though
    # Adam's step there is ~sign(g). The same formula on g / 2^e, mu / 2^e, nu / 4^e, eps / 2^e
    # (e the entry's exponent: exact scaling) is the same ratio; only those entries change.
    e = torch.frexp(G)[1]
    Gs = torch.ldexp(G, -e).to(G.dtype)
    ms = (b1 * torch.ldexp(ck.mu[:, None].expand_as(G), -e) + (1 - b1) * Gs) / (1 - b1 ** t)
    vs = (b2 * torch.ldexp(ck.nu[:, None].expand_as(G), -2 * e) + (1 - b2) * Gs * Gs) / (1 - b2 ** t)
    eps = torch.ldexp(torch.full_like(G, ck.eps), -e)
    return torch.where(torch.isfinite(den), out, (ms / (vs.sqrt() + eps)).to(G.dtype))


def less(loss: Loss | FunctionalModel, *, target: Loss | FunctionalModel | None = None,
         checkpoints: Sequence[int] | None = None, proj_dim: int | None = None,
         kind: str = "rademacher", seed: int = 0, chunk_size: int | None = None) -> Method:
    """Return LESS: ``scores[i, j] = sum_c lr_c cos(Gamma_c(z_i), grad target(theta_c, z_j))``.

    ``params`` given to ``prepare``/``score``/``self_score`` is the
    :class:`~dattri_fn.training.Record` of an Adam/AdamW run (see the module docstring for
    ``Gamma``).  # -> [n_train, n_test]

    Args:
        loss: per-example training loss, or a FunctionalModel (its ``loss``).
        target: test-side function whose DECREASE a positive score predicts (default ``loss``).
        checkpoints: the step indices of the record's checkpoints to sum over (default: every
            checkpoint before the final state).
        proj_dim, kind, seed: random projection of ``Gamma`` and of the test gradients (None:
            exact); see :func:`~dattri_fn.transforms.project.make_projector`.
        chunk_size: examples per per-sample-gradient call.

    Example:
        >>> record = finish_record(rec, params=params, opt_state=state)   # an AdamW run
        >>> scores = less(loss).score(record, (), train, test)          # [n_train, n_test]
    """
    return optimizer_method("less", loss, adam_direction, target=target, checkpoints=checkpoints,
                            normalize=True, min_count=0, proj_dim=proj_dim, kind=kind, seed=seed,
                            chunk_size=chunk_size)


__all__ = ["RecordedCheckpoints", "adam_direction", "less", "recorded_checkpoints"]
