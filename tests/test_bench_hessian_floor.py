"""benchmarks.hessian_floor: its FLOP count, HVP call count and floor arithmetic on toy sizes."""

import math

import pytest
import torch

from benchmarks import hessian_floor as hf
from benchmarks import run
from dattri_fn.operators import curvature
from dattri_fn.operators.curvature import hvp


@pytest.mark.slow  # the flop counter's first use imports its shape machinery (~5 s)
def test_count_flops_of_one_product():
    """count_flops(a @ b) == 2 m k n for a [m, k] x [k, n] product."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen), torch.randn(5, 3, generator=gen)
    assert hf.count_flops(lambda: a @ b) == 2 * 7 * 5 * 3


def test_gemm_rate_is_a_positive_rate():
    """gemm_rate > 0 and finite (FLOP/s of a square float32 product on this thread)."""
    rate = hf.gemm_rate(sizes=(32,), repeats=2)
    assert math.isfinite(rate) and rate > 0


def test_hvp_calls_counts_rows_times_examples_and_restores():
    """Two batches (5 and 3 examples), V of 4 rows: 2 calls, 4 * 8 row-examples; the product
    is torch.equal to the uncounted one and the operator's function is restored after."""
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, generator=gen, dtype=torch.float64)}
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    data = [(x[:5],), (x[5:],)]
    loss = lambda p, ex: torch.tanh(ex[0] @ p["w"]) ** 2  # noqa: E731
    H = hvp(loss, params, data)
    V = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    want = H(V)
    inner = curvature._plain_rev_rev
    got = []
    calls, rows = hf.hvp_calls(lambda: got.append(H(V)))
    assert (calls, rows) == (2, 4 * 8)
    assert torch.equal(got[0], want)
    assert curvature._plain_rev_rev is inner


def test_hvp_calls_counts_the_mlp_r_operator_and_restores():
    """The MLP R-operator in row steps of 4 over 9 examples, V of 2 rows: 3 products,
    2 * 9 row-examples; the product is torch.equal to the uncounted one."""
    import torch.nn.functional as F
    from torch import nn

    from dattri_fn.operators import linear_mlp

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (9,), generator=gen)
    H = linear_mlp.mlp_hessian(m, F.cross_entropy, params, (x, y), batch_rows=4)
    V = torch.randn(2, H.dim, generator=gen, dtype=torch.float64)
    want, inner, got = H(V), linear_mlp._product, []
    assert hf.hvp_calls(lambda: got.append(H(V))) == (3, 2 * 9)
    assert torch.equal(got[0], want)
    assert linear_mlp._product is inner


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:ihvp_cg")  # 5 CG steps on purpose: rows not converged
def test_compare_row_without_dattri():
    """compare(): floor = FLOPs / rate, ours / floor = time / floor, and the CG run's HVP rows
    are (iterations' rows) x n_train (every call covers all training examples)."""
    args = run.parse_args(["--task", "digits-mlp", "--n-train", "40", "--n-test", "3",
                           "--models", "1", "--quiet"])
    task = run.load_task(run.task_spec(args))
    models = run.load_models(task, run.train_states(task, 1))
    hp = {**run.hyper_parameters(args), "max_iter": 5}
    row = hf.compare("if-cg", task, models, hp, rounds=1, rate=1e9, with_dattri=False)
    assert row["ours_flops"] > 0
    assert row["ours_floor_s"] == row["ours_flops"] / 1e9
    assert row["ours_over_floor"] == row["ours_s"] / row["ours_floor_s"]
    assert row["hvp_calls"] >= 1 and row["hvp_row_examples"] % 40 == 0
    assert "dattri_s" not in row
    assert "| if-cg |" in hf.table([row], 1e9)


@pytest.mark.slow  # the flop counter's shape machinery, as above
def test_count_flops_counts_in_place_gemms():
    """addmm_, baddbmm_ and addbmm(_) count 2 (b) m k n, as their out-of-place forms do
    (FlopCounterMode alone counts the in-place ones as 0)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen), torch.randn(5, 3, generator=gen)
    A, B = torch.randn(4, 7, 5, generator=gen), torch.randn(4, 5, 3, generator=gen)
    c, C = torch.zeros(7, 3), torch.zeros(4, 7, 3)
    assert hf.count_flops(lambda: c.addmm_(a, b)) == hf.count_flops(lambda: torch.addmm(c, a, b))
    assert hf.count_flops(lambda: c.addmm_(a, b)) == 2 * 7 * 5 * 3
    assert hf.count_flops(lambda: C.baddbmm_(A, B)) == 2 * 4 * 7 * 5 * 3
    assert hf.count_flops(lambda: c.addbmm_(A, B)) == 2 * 4 * 7 * 5 * 3
    assert hf.count_flops(lambda: torch.addbmm(c, A, B)) == 2 * 4 * 7 * 5 * 3


@pytest.mark.slow  # the flop counter's shape machinery, as above
def test_count_flops_of_the_mlp_r_operator_is_its_gemms():
    """One R-operator product on a 5-4-3 tanh MLP, B examples, k rows: 2 GEMMs of
    2 B k 4 5 FLOPs in the first layer (R z, the weight block) and 6 of 2 B k 3 4 in the
    last (R z, W R a, two weight-block terms, R e, V_W^T delta), in-place ones included."""
    import torch.nn.functional as F
    from torch import nn

    from dattri_fn.operators import linear_mlp

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    B, k = 9, 2
    x = torch.randn(B, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=gen)
    H = linear_mlp.mlp_hessian(m, F.cross_entropy, params, (x, y))
    V = torch.randn(k, H.dim, generator=gen, dtype=torch.float64)
    per = lambda o, i: 2 * B * k * o * i  # noqa: E731
    assert hf.count_flops(lambda: H(V)) == 2 * per(4, 5) + 6 * per(3, 4)
