"""DVEmb with a projection R [P, d] at prepare, reduced to the unprojected space.

Since ``(I - eta (R^T H R + wd I)) R^T = R^T (I - eta (H M + wd I))`` with ``M = R R^T``, the
projected score is ``q^T M prod_k (I - eta_k (H_k M + wd I)) g_t`` summed over the steps: a
polynomial in ``M`` alone, equal to the exact DVEmb at ``M = I``. So the projection's error is
bounded by ``delta = ||R R^T - I||_2`` (a Lipschitz bound of that polynomial), and ``delta``
concentrates like JL as ``d`` grows: for ``R`` with iid ``N(0, 1/d)`` entries, the singular
values of ``R`` lie in ``1 +- (sqrt(P/d) + t)`` with probability at least ``1 - 2 exp(-d t^2/2)``
(Davidson & Szarek 2001, Thm II.13).
"""

import math

import pytest
import torch
from test_dvemb import DT, queries, sgd_run

from dattri_fn.attribute.dvemb import dvemb
from dattri_fn.testing.problems import per_example_grads
from dattri_fn.training import take


def _steps(record, loss, data, test):
    """Exact per-step batch gradients ``[B, P]``, test gradients ``q [n_test, P]`` at the end."""
    at = {c.step: c.params for c in record.checkpoints}
    Gs = [per_example_grads(loss, at[t], take(data, record.order[t])) for t in range(record.steps)]
    return Gs, per_example_grads(loss, record.final.params, test)


def _factors(record, Gs, M, wd=0.01):
    """``A_k(M) = I - eta_k (G_k^T G_k / B M + wd I)``, one per step."""
    eye = torch.eye(M.shape[0], dtype=DT)
    return [eye - float(record.lrs[k]) * (G.T @ G / G.shape[0] @ M + wd * eye) for k, G in enumerate(Gs)]


def _reference(record, Gs, q, M, n=12):
    """``scores[i, j] = sum_{t: i in B_t} (eta_t / B) q_j^T M A_{T-1}(M) ... A_{t+1}(M) g_t(z_i)``."""
    A = _factors(record, Gs, M)
    ref = torch.zeros(n, q.shape[0], dtype=DT)
    for t in range(record.steps):
        prod = torch.eye(M.shape[0], dtype=DT)
        for k in range(t + 1, record.steps):
            prod = A[k] @ prod
        B = Gs[t].shape[0]
        for r, i in enumerate(record.order[t].tolist()):
            ref[i] += float(record.lrs[t]) / B * (q @ M @ prod @ Gs[t][r])
    return ref


def _projected(record, loss, data, test, R):
    method = dvemb(loss, projection=R)
    return method.score(record, method.prepare(record, data), data, test)


@pytest.mark.parametrize("d", [3, 6, 38, 80])
def test_projected_scores_are_the_recursion_at_M_equal_R_Rt(tmp_path, d):
    """A Gaussian R [P, d] (d below, at and above P = 38): scores == the P-space recursion with
    M = R R^T in every factor, 1e-10."""
    record, loss, data, *_ = sgd_run(tmp_path)
    test = queries()
    Gs, q = _steps(record, loss, data, test)
    P = q.shape[1]
    R = torch.randn(P, d, generator=torch.Generator().manual_seed(d), dtype=DT) / math.sqrt(d)
    torch.testing.assert_close(_projected(record, loss, data, test, R), _reference(record, Gs, q, R @ R.T),
                               rtol=1e-10, atol=1e-12)


def test_scores_depend_on_R_only_through_R_Rt(tmp_path):
    """R and R Q (Q orthogonal [d, d]) give the same scores; an orthogonal R [P, P] gives the exact
    (unprojected) DVEmb; 1e-10."""
    record, loss, data, *_ = sgd_run(tmp_path)
    test = queries()
    P = sum(v.numel() for v in record.final.params.values())
    g = torch.Generator().manual_seed(3)
    R = torch.randn(P, 20, generator=g, dtype=DT) / math.sqrt(20)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=DT))
    torch.testing.assert_close(_projected(record, loss, data, test, R @ Q),
                               _projected(record, loss, data, test, R), rtol=1e-10, atol=1e-12)
    U, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    exact = dvemb(loss)
    torch.testing.assert_close(_projected(record, loss, data, test, U),
                               exact.score(record, exact.prepare(record, data), data, test),
                               rtol=1e-10, atol=1e-12)


def _bound(record, Gs, q, delta, n=12):
    """Entrywise bound on |s(M) - s(I)| for ||M - I||_2 <= delta: with a_k = ||A_k(I)||_2 and
    e_k = eta_k ||G_k^T G_k / B||_2 delta, ||prod A(M) - prod A(I)|| <= prod (a_k + e_k) - prod a_k,
    and q^T M P' g - q^T P g = q^T (M - I) P' g + q^T (P' - P) g."""
    eye = torch.eye(q.shape[1], dtype=DT)
    a = [torch.linalg.matrix_norm(A, ord=2).item() for A in _factors(record, Gs, eye)]
    e = [float(record.lrs[k]) * torch.linalg.matrix_norm(G.T @ G / G.shape[0], ord=2).item() * delta
         for k, G in enumerate(Gs)]
    qn = q.norm(dim=1)
    out = torch.zeros(n, q.shape[0], dtype=DT)
    for t in range(record.steps):
        upper = math.prod(a[k] + e[k] for k in range(t + 1, record.steps))
        lower = math.prod(a[k] for k in range(t + 1, record.steps))
        B = Gs[t].shape[0]
        for r, i in enumerate(record.order[t].tolist()):
            out[i] += float(record.lrs[t]) / B * qn * Gs[t][r].norm() * (delta * upper + upper - lower)
    return out


@pytest.mark.parametrize("ratio", [4, 16, 64])
def test_projection_error_is_bounded_by_the_distance_of_R_Rt_from_identity(tmp_path, ratio):
    """Gaussian R [P, d = ratio P] with N(0, 1/d) entries: delta = ||R R^T - I||_2 is within the
    Davidson-Szarek bound (1 + sqrt(P/d) + t)^2 - 1 at failure probability 2 exp(-d t^2 / 2) = 1e-6
    (the seed is fixed, so this is a check of that seed, not a chance event), and every score's
    error is within the Lipschitz bound of the M-polynomial at delta. The bound -> 0 as d -> inf."""
    record, loss, data, *_ = sgd_run(tmp_path)
    test = queries()
    Gs, q = _steps(record, loss, data, test)
    P = q.shape[1]
    d = ratio * P
    R = torch.randn(P, d, generator=torch.Generator().manual_seed(ratio), dtype=DT) / math.sqrt(d)
    delta = torch.linalg.matrix_norm(R @ R.T - torch.eye(P, dtype=DT), ord=2).item()
    t = math.sqrt(2 * math.log(2 / 1e-6) / d)
    assert delta <= (1 + math.sqrt(P / d) + t) ** 2 - 1
    err = (_projected(record, loss, data, test, R) - _reference(record, Gs, q, torch.eye(P, dtype=DT))).abs()
    bound = _bound(record, Gs, q, delta)
    assert bool((err <= bound * (1 + 1e-9) + 1e-13).all())
    assert 0 < err.max() < bound.max()
