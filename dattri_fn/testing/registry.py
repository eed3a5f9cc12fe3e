"""ONE registry of dattri_fn's own solvers, operators, projectors and methods, with the check
each must pass and the settings it is checked under. ``tests/test_registry_contracts.py`` runs
every contract over all of it, so the kit and what the library trusts cannot drift apart.

    SOLVERS      name -> Entry(build() -> solver(op, damping=...) -> LinOp, check_inverse options)
    OPERATORS    name -> Entry(build(problem) -> (LinOp, dense reference), check_linop options)
    PROJECTORS   name -> Entry(build() -> make(dim, proj_dim, seed), check_projector options)
    METHODS      name -> Entry(build(problem) -> Method, check_method options)

``Entry.kinds`` names the problem kinds an entry applies to (e.g. the factored Gauss-Newton
needs the MLP's ``nn.Module``); ``Entry.applies(problem)`` says it. A method entry's
``"store": False`` option skips ``check_method``'s feature-store property (the test passes a
directory to every other method).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import solvers as _solvers
from .._types import as_linop
from ..attribute import grad_cos, grad_dot, influence, logra, representer, tracin, trak
from ..model import functional_model
from ..operators import gauss_newton
from ..operators.curvature import fvp, gnvp, hvp
from ..operators.linear_curvature import linear_gnvp, linear_hessian
from ..solve import (
    cg_solve,
    ekfac_factors,
    ihvp_arnoldi_full_rank,
    ihvp_cg,
    ihvp_datainf,
    ihvp_ekfac,
    ihvp_explicit,
    ihvp_kfac,
    ihvp_lissa,
    kfac_factors,
)
from ..transforms.project import make_projector
from .problems import Problem
from .projector_checks import jl_d_eff
from .references import dense_curvature, per_example_grads

__all__ = ["METHODS", "MIXED_INPUT_DEFECTS", "OPERATORS", "PROJECTORS", "SOLVERS", "Entry",
           "mlp_module"]


class Entry(NamedTuple):
    """A registered value: how to build it, the keyword arguments of its check, and the
    problem kinds it applies to (None: all; solvers and projectors take no problem)."""

    build: Callable[..., Any]
    options: dict[str, Any]
    kinds: tuple[str, ...] | None = None

    def applies(self, problem: Problem) -> bool:
        """Whether the entry applies to ``problem`` (its kind, and no l2 term for the module)."""
        return self.kinds is None or (problem.name in self.kinds and not (
            problem.name == "mlp" and problem.l2))


# -- solvers --------------------------------------------------------------------------------------
def _lissa(max_depth: int):
    """LiSSA over full batches of per-example curvatures ``A + E_i`` (``sum_i E_i = 0``), scale
    ``1.2 (lambda_max + damping)``: a deterministic Neumann series that converges to the solve.
    Its depth is what a contraction rate ``1 - mu_min / scale`` needs for ``1e-10`` (at most
    ``max_depth``): LiSSA's own settings, chosen as a user who knows the spectrum would."""

    def solver(op, damping=0.0):
        A = op if isinstance(op, torch.Tensor) else op.dense()
        g = torch.Generator().manual_seed(123)
        E = 0.05 * torch.randn(4, *A.shape, generator=g, dtype=torch.float64).to(A)
        E = E + E.transpose(1, 2)
        Hs = A + (E - E.mean(0))
        lam = torch.linalg.eigvalsh(A.double())
        scale = 1.2 * (float(lam[-1].abs()) + damping)
        mu = float(lam[0]) + damping
        rate = 1 - mu / scale if 0 < mu < scale else 1.0
        depth = max_depth if rate >= 1 else min(max_depth, max(1, math.ceil(-23 / math.log(rate))))
        return ihvp_lissa(lambda idx: Hs[idx].mean(0), torch.arange(4), damping=damping,
                          scale=scale, depth=depth)

    solver.__name__ = "lissa"
    return solver


SOLVERS: dict[str, Entry] = {
    "explicit": Entry(lambda: _solvers.explicit(), {"rtol": 1e-9}),
    "explicit_lu": Entry(lambda: _solvers.explicit(method="lu"), {"rtol": 1e-9}),
    # CG's own report (CGResult) is checked too: converged rows solved, failures flagged.
    "cg": Entry(lambda: _solvers.cg(rtol=1e-12, max_iter=200), {"rtol": 1e-8, "diagnostics": (
        lambda op, damping, V: cg_solve(op, V, damping=damping, rtol=1e-12, max_iter=200))}),
    "minres": Entry(lambda: _solvers.minres(rtol=1e-12, max_iter=200), {"rtol": 1e-8}),
    "arnoldi": Entry(lambda: ihvp_arnoldi_full_rank, {"rtol": 1e-8}),  # rank P: exact
    "lissa": Entry(lambda: _lissa(max_depth=3000), {"rtol": 1e-6, "cond": 10.0,
                                                    "kinds": ("spd",)}),
}


# -- operators ------------------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def mlp_module(problem: Problem) -> nn.Module:
    """The :func:`~dattri_fn.testing.problems.mlp` problem as an ``nn.Module`` (same parameter
    names, values, dtype and device), for the factored paths that need the module."""
    if problem.name != "mlp":
        raise ValueError(f"mlp_module(problem=...): expected the mlp problem, got {problem.name!r}.")
    W1, W2 = problem.params["l1.weight"], problem.params["l2.weight"]
    module = _MLP(W1.shape[1], W1.shape[0], W2.shape[0]).to(dtype=W1.dtype, device=W1.device)
    with torch.no_grad():
        for k, v in module.named_parameters():
            v.copy_(problem.params[k])
    return module.eval()


def _batches(problem: Problem, size: int = 5) -> list:
    x, y = problem.data
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def _op(kind: str, make):
    return lambda problem: (make(problem), dense_curvature(problem, kind))


def _gnvp(p: Problem):
    op = gnvp(p.forward, p.out_loss, p.params, p.data)
    return op + 2 * p.l2 if p.l2 else op


MLP = ("mlp",)


def _fm(p: Problem):
    return functional_model(mlp_module(p), F.cross_entropy)


def _sum_reference(p: Problem):
    eye = torch.eye(p.num_params, dtype=p.params[next(iter(p.params))].dtype,
                    device=p.params[next(iter(p.params))].device)
    return 2 * dense_curvature(p, "hessian") + dense_curvature(p, "fisher") - 0.5 * eye


def _grads(p: Problem):
    return per_example_grads(p.loss, p.params, p.data)


def _datainf_reference(p: Problem, damping: float):
    """DataInf's one-block operator ``(1/n) sum_i (g_i g_i^T + damping I)^-1``, inverted densely."""
    G = _grads(p)
    eye = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
    return torch.stack([torch.linalg.inv(g[:, None] * g[None, :] + damping * eye)
                        for g in G]).mean(0)


def _damped_inverse(p: Problem):
    G = dense_curvature(p, "gauss_newton")
    return ihvp_explicit(G, damping=0.1)


def _inverse_reference(p: Problem):
    G = dense_curvature(p, "gauss_newton")
    return torch.linalg.inv(G + 0.1 * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))


OPERATORS: dict[str, Entry] = {
    "hvp": Entry(_op("hessian", lambda p: hvp(p.loss, p.params, p.data)), {}),
    "hvp_fwd_rev": Entry(_op("hessian", lambda p: hvp(p.loss, p.params, p.data, mode="fwd-rev")),
                         {}),
    "hvp_batches": Entry(_op("hessian", lambda p: hvp(p.loss, p.params, _batches(p),
                                                      batch_rows=7)), {}),
    "gnvp": Entry(_op("gauss_newton", _gnvp), {}),
    "fvp": Entry(_op("fisher", lambda p: fvp(p.loss, p.params, _batches(p))), {}),
    "hvp_plus_fvp": Entry(lambda p: (2 * hvp(p.loss, p.params, p.data)
                                     + fvp(p.loss, p.params, p.data) - 0.5, _sum_reference(p)), {}),
    "explicit_inverse": Entry(lambda p: (_damped_inverse(p), _inverse_reference(p)), {}),
    "cg_inverse": Entry(lambda p: (ihvp_cg(dense_curvature(p, "gauss_newton"), damping=0.1,
                                           rtol=1e-13, max_iter=200), _inverse_reference(p)),
                        {"rtol": 1e-8}),
    "datainf_inverse": Entry(lambda p: (ihvp_datainf(_grads(p), damping=0.1),
                                        _datainf_reference(p, 0.1)), {}),
    "kfac_inverse": Entry(lambda p: (ihvp_kfac(kfac_factors(
        mlp_module(p), F.cross_entropy, p.params, p.data), damping=0.1), None), {}, MLP),
    "ekfac_inverse": Entry(lambda p: (ihvp_ekfac(ekfac_factors(
        mlp_module(p), F.cross_entropy, p.params, p.data), damping=0.1), None), {}, MLP),
    "linear_hessian": Entry(_op("hessian", lambda p: as_linop(linear_hessian(
        mlp_module(p), F.cross_entropy, p.params, p.data), name="linear_hessian")), {}, MLP),
    "linear_gnvp": Entry(_op("gauss_newton", lambda p: linear_gnvp(
        mlp_module(p), F.cross_entropy, p.params, p.data)), {}, MLP),
    "gauss_newton": Entry(_op("gauss_newton", lambda p: gauss_newton(_fm(p))(p.params, p.data)),
                          {}, MLP),
}


# Operators that break check_linop's mixed_input contract (rows of another dtype than the
# operator's): checked without it, and tests/test_registry_contracts.py expects each to fail it
# (strict xfail), so a fix shows up as an unexpected pass. Empty since LinOp.__call__ refuses
# rows of another dtype/device naming V (the ten operators listed before passed through a dense
# matmul, promoted silently, or blamed the data).
MIXED_INPUT_DEFECTS: dict[str, str] = {}
OPERATORS = {name: entry._replace(options={**entry.options, "mixed_input": (
    None if name in MIXED_INPUT_DEFECTS else "follow_or_refuse")})
    for name, entry in OPERATORS.items()}


# -- projectors -----------------------------------------------------------------------------------
def _projector(kind: str, nnz: int = 1):
    def make(dim, proj_dim, seed):
        return make_projector(dim, proj_dim=proj_dim, kind=kind, seed=seed, nnz=nnz,
                              dtype=torch.float64)

    make.__name__ = f"{kind}" + (f"(nnz={nnz})" if kind == "sjlt" else "")
    return make


PROJECTORS: dict[str, Entry] = {
    "gaussian": Entry(lambda: _projector("gaussian"), {"d_eff": jl_d_eff("gaussian", 256)}),
    "rademacher": Entry(lambda: _projector("rademacher"), {"d_eff": jl_d_eff("rademacher", 256)}),
    "sjlt": Entry(lambda: _projector("sjlt"), {"d_eff": jl_d_eff("sjlt", 256)}),
    "sjlt_nnz3": Entry(lambda: _projector("sjlt", 3), {"d_eff": jl_d_eff("sjlt", 256, 3)}),
}


# -- methods --------------------------------------------------------------------------------------
def _influence(solver, **options):
    def build(p: Problem):
        # A plain loss's Hessian is indefinite off the convex problems: the Fisher there.
        curvature = "hessian" if p.convex else "fisher"
        opts = {k: v(p) if callable(v) else v for k, v in options.items()}
        return influence(p.loss, solver=solver, damping=1e-3, curvature=curvature, **opts)

    return build


def _representer(p: Problem):
    if p.name == "logistic":
        feature, head = (lambda q, z: z[0]), (lambda q, h: q["W"] @ h + q["b"])
    else:
        feature = lambda q, z: torch.tanh(q["l1.weight"] @ z[0] + q["l1.bias"])
        head = lambda q, h: q["l2.weight"] @ h + q["l2.bias"]
    return representer(feature, head, lambda o, y: F.cross_entropy(o[None], y[None]), l2=0.05)


_P = lambda p: p.num_params


def _lissa_scale(p: Problem) -> float:
    """``1.2 (lambda_max + damping)`` of the curvature influence inverts: a contraction."""
    C = dense_curvature(p, "hessian" if p.convex else "fisher")
    return 1.2 * (float(torch.linalg.eigvalsh(C)[-1]) + 1e-3)

METHODS: dict[str, Entry] = {
    "if_explicit": Entry(_influence("explicit"), {}),
    "if_cg": Entry(_influence("cg", rtol=1e-12, max_iter=200), {}),
    "if_minres": Entry(_influence("minres", rtol=1e-12, max_iter=200), {}),
    "if_arnoldi": Entry(_influence("arnoldi", rank=_P, max_iter=_P), {}),
    # One HVP per recursion step and ~10 prepare/score calls per check: one problem only.
    "if_lissa": Entry(_influence("lissa", scale=lambda p: _lissa_scale(p), depth=50),
                      {"min_loo_corr": None}, ("ridge",)),  # 50 steps: not converged
    "if_datainf": Entry(_influence("datainf"), {"min_loo_corr": None}),
    "grad_dot": Entry(lambda p: grad_dot(p.loss), {"min_loo_corr": None}),
    "grad_cos": Entry(lambda p: grad_cos(p.loss), {"min_loo_corr": None}),
    "tracin": Entry(lambda p: tracin(p.loss, lrs=[0.5]), {"min_loo_corr": None}),
    # TRAK's cached state reads no train side; its self_score reads no store (not stream_self).
    "trak": Entry(lambda p: trak(p.loss, damping=1e-3), {"min_loo_corr": None, "store": False}),
    "trak_projected": Entry(lambda p: trak(p.loss, proj_dim=8, kind="gaussian", damping=1e-3),
                            {"min_loo_corr": None, "store": False}),
    "grad_dot_projected": Entry(lambda p: grad_dot(p.loss, proj_dim=8, kind="sjlt"),
                                {"min_loo_corr": None}),
    # Uncached TRAK reads the train side through a store; its self-scores are bound to the state.
    "trak_uncached": Entry(lambda p: trak(p.loss, damping=1e-3, cache_features=False),
                           {"min_loo_corr": None}),
    "representer": Entry(_representer, {"min_loo_corr": None}, ("logistic", "mlp")),
    # The model's own fast paths (capture engine, factored curvature), on the MLP's module:
    "if_gauss_newton_fm": Entry(lambda p: influence(_fm(p), solver="cg", damping=1e-3,
                                                    rtol=1e-12, max_iter=200),
                                {"min_loo_corr": None}, MLP),
    "if_kfac_fm": Entry(lambda p: influence(_fm(p), solver="kfac", damping=1e-3),
                        {"min_loo_corr": None}, MLP),
    "if_ekfac_fm": Entry(lambda p: influence(_fm(p), solver="ekfac", damping=1e-3),
                         {"min_loo_corr": None}, MLP),
    "grad_dot_fm": Entry(lambda p: grad_dot(_fm(p)), {"min_loo_corr": None}, MLP),
    "tracin_fm": Entry(lambda p: tracin(_fm(p), lrs=[0.5]), {"min_loo_corr": None}, MLP),
    "logra_fm_uncached": Entry(lambda p: logra(_fm(p), proj_dim=2, cache_features=False,
                                               damping=1e-3), {"min_loo_corr": None}, MLP),
}
