"""The plan check's comparison in one block (layer_grads_gap._gap_sums, stop 23).

_gap_sums now reads the compared rows as a strided view and takes every maximum from one
``[2r + k + 1, P]`` block: its ``(error, scale, dtype)`` must equal the former op-by-op
formula (kept here as the reference) exactly, and a deliberately broken capture (factors
perturbed on the last, or only on a middle, example) must still make the checked plan dense.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.transforms import layer_grads_paths as paths
from dattri_fn.transforms.layer_grads import check_plan, layer_plan
from dattri_fn.transforms.layer_grads_gap import _gap_sums
from dattri_fn.transforms.layer_grads_paths import _factored_and_rows
from dattri_fn.transforms.mlp_io import mlp_chain

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mlp(seed):
    g = _gen(seed)
    # GELU: a model mlp_io does not certify, so its plan takes the check (issue 14), which is
    # what these tests break and must see
    m = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    assert mlp_chain(m) is None
    return m.double().eval()


def _xy(seed, n):
    g = _gen(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _former(lg, ref, sums, k, at):
    """The op-by-op formula _gap_sums had before stop 23 (the reference)."""
    rows = lg.to_dense()[0]
    r = len(at)
    want = torch.cat([torch.cat([v.reshape(r, -1) for v in ref.values()], 1),
                      torch.cat([v.reshape(1, -1) for v in sums.values()], 1)])
    got = torch.cat([rows[list(at)], rows.sum(0, keepdim=True)])
    values = torch.cat([(got - want).abs().amax(1), rows.abs().amax(1),
                        want[:r].abs().amax().reshape(1)]).tolist()
    err_r, err_s = max(values[:r]), values[r]
    scale_s, scale_r = max(values[r + 1:r + 1 + k]), values[-1]
    if any(v != v for v in values[:r + 1]):
        return float("nan"), max(scale_r, scale_s), want.dtype
    worse = err_s * max(scale_r, 1e-30) > err_r * max(scale_s, 1e-30)
    return (err_s, scale_s, want.dtype) if worse else (err_r, scale_r, want.dtype)


@pytest.mark.parametrize("k, at", [(3, (0,)), (3, (0, 2)), (2, (0, 1)), (4, (0, 3)), (4, (0, 2))])
@pytest.mark.parametrize("seed", [0, 1])
def test_gap_sums_equals_the_former_formula(k, at, seed):
    """(err, scale, dtype) == the former formula's, exactly, on clean and perturbed rows."""
    fm = functional_model(_mlp(seed), F.cross_entropy)
    stacked = {key: v[None] for key, v in fm.params.items()}
    (lg, *_), ref, sums = _factored_and_rows(layer_plan(fm), stacked, _xy(seed + 10, k), False,
                                             k, ref_at=at)
    assert _gap_sums(lg, ref, sums, k, at=at) == _former(lg, ref, sums, k, at)
    noisy = {key: v + 1e-3 * torch.randn(v.shape, generator=_gen(seed), dtype=DT)
             for key, v in ref.items()}
    got = _gap_sums(lg, noisy, sums, k, at=at)
    assert got == _former(lg, noisy, sums, k, at) and got[0] > 1e-5


def _broken(monkeypatch, row):
    """Make the capture pass return factors whose output gradient of example ``row`` is 1%
    off: a capture bug the check must see."""
    real = paths._assemble

    def assemble(plan, raw, rest, lead):
        lg, layout = real(plan, raw, rest, lead)
        factors = {}
        for n, (a, g) in lg.factors.items():
            g = g.clone()
            g[:, row] *= 1.01
            factors[n] = (a, g)
        return lg._replace(factors=factors), layout

    monkeypatch.setattr(paths, "_assemble", assemble)


@pytest.mark.parametrize("n, row", [(3, 2), (3, 1), (2, 1), (2, 0)])
def test_a_broken_capture_is_still_caught(monkeypatch, n, row):
    """A capture 1% off on one example (the last, the middle or the first): warned and dense.
    Each such fault also changes the sum, so the sum identity sees it too; the swap test below
    is the one only the last row's comparison can catch."""
    fm = functional_model(_mlp(3), F.cross_entropy)
    batch = _xy(4, n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_plan(layer_plan(fm), fm.params, batch).dense  # clean: captured
    _broken(monkeypatch, row)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        plan = check_plan(layer_plan(fm), fm.params, batch)
    assert plan.dense


def test_examples_swapped_by_the_capture_are_caught_by_the_last_row(monkeypatch):
    """The capture returns examples 1 and 2 of 3 swapped (a and g both): the sum identity and
    the first row still hold, so only the last row's comparison (the strided view) sees it."""
    real = paths._assemble

    def assemble(plan, raw, rest, lead):
        lg, layout = real(plan, raw, rest, lead)
        swap = torch.tensor([0, 2, 1])
        factors = {n: (a[:, swap], g[:, swap]) for n, (a, g) in lg.factors.items()}
        return lg._replace(factors=factors), layout

    fm = functional_model(_mlp(3), F.cross_entropy)
    batch = _xy(4, 3)
    monkeypatch.setattr(paths, "_assemble", assemble)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        plan = check_plan(layer_plan(fm), fm.params, batch)
    assert plan.dense


def test_a_broken_capture_in_prepare_leaves_scores_exact(monkeypatch):
    """grad_dot's prepare (its 3 check rows) sees a capture broken on the middle example: the
    state decides dense, and its scores equal the plain vmap(grad) Grad-Dot at 1e-12."""
    fm = functional_model(_mlp(5), F.cross_entropy)
    train, test = _xy(6, 8), _xy(7, 4)
    _broken(monkeypatch, 1)
    method = grad_dot(fm)
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        state = method.prepare(fm.params, train)
    assert state.train.dense
    S = method.score(fm.params, state, train, test)
    want = grad_dot(fm.loss).score(fm.params, (), train, test)
    torch.testing.assert_close(S, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("top_k", [None, 2])
def test_non_finite_scores_from_one_pass_raise(top_k):
    """Finite params and data whose float32 logits overflow beyond the examples the plan check
    compares (the test rows and train row 0 are tiny: the check passes): the one-pass scores
    are NaN and score raises naming train (one scan of the written blocks, or per block with
    top_k). Overflow on the compared examples is refused by the check itself
    (tests/test_plan_check_nonfinite.py)."""
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.fill_(1e30)
        m.bias.zero_()
    fm = functional_model(m.eval(), F.cross_entropy)
    g = _gen(8)
    x = torch.randn(6, 4, generator=g) * 1e10
    x[:1] *= 1e-40
    train = [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([2, 1, 0]))]
    test = (x[:2] * 1e-40, torch.tensor([1, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=r"grad_dot\(train=...\).*NaN or inf in the scores"):
            grad_dot(fm).score(fm.params, (), train, test, top_k=top_k)
