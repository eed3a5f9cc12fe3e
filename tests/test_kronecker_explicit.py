"""KroneckerProjector and FactGraSS hold their sketches as values drawn once: nothing kept per call."""

import pytest
import torch
from test_factgrass import _problem

from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.model import functional_model
from dattri_fn.transforms.kronecker import KroneckerLayer, make_kronecker_projector

LAYERS = {"a": KroneckerLayer("a.weight", "a.bias", "linear", 9, 7),
          "b": KroneckerLayer("b.weight", None, "linear", 5, 11)}


def _snapshot(kp) -> dict:
    """Every attribute of ``kp`` by identity, and the identities inside its dicts."""
    return {k: (id(v), tuple(map(id, v.values())) if isinstance(v, dict) else None)
            for k, v in vars(kp).items()}


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "mask"])
def test_operators_are_drawn_at_construction(kind):
    """kp.ops[f] == f's operator in (dtype, device) of construction: a mask's picks, else f.matrix."""
    kp = make_kronecker_projector(LAYERS, proj_dim=3, kind=kind, seed=4, dtype=torch.float64)
    assert kp.dtype == torch.float64 and kp.device == torch.device("cpu")
    factors = [f for pair in kp.factors.values() for f in pair if f is not None]
    assert set(kp.ops) == set(factors) and len(factors) == 4
    for f in factors:
        if kind == "mask":
            assert torch.equal(kp.ops[f][0], f.picks("cpu")[0])
        else:
            assert torch.equal(kp.ops[f], f.matrix(torch.float64, "cpu"))


@pytest.mark.parametrize("kind", ["gaussian", "mask"])
def test_calls_in_any_dtype_keep_nothing(kind):
    """Calls in the held dtype and in another leave every attribute as it was; each equals g' a'^T
    of the dense factors in its dtype (torch.equal to a projector drawn in that dtype)."""
    kp = make_kronecker_projector(LAYERS, proj_dim=3, kind=kind, seed=1)  # float32 by default
    before = _snapshot(kp)
    for dt in (torch.float64, torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(4, 8, generator=g, dtype=dt)
        gr = torch.randn(4, 9, generator=g, dtype=dt)
        got = kp.project_factors("a", a, gr)
        other = make_kronecker_projector(LAYERS, proj_dim=3, kind=kind, seed=1, dtype=dt)
        assert torch.equal(got, other.project_factors("a", a, gr))
        P_in, P_out = kp.matrices("a", dt, "cpu")
        want = ((gr @ P_out)[:, :, None] * (a @ P_in)[:, None, :]).flatten(1)
        tol = 1e-5 if dt == torch.float32 else 1e-12
        assert float((got - want).abs().max()) <= tol * float(want.abs().max())
        ones = torch.cat([a[:, :-1], a.new_ones(4, 1)], 1)
        assert torch.equal(kp.project_sides("a", a[:, :-1], gr, ones=True)[0],
                           kp.project_sides("a", ones, gr)[0])
    assert _snapshot(kp) == before


def test_dtype_is_checked():
    """make_kronecker_projector(dtype=torch.int64) raises naming dtype."""
    with pytest.raises(TypeError, match=r"make_kronecker_projector\(dtype=...\): expected a floating"):
        make_kronecker_projector(LAYERS, proj_dim=3, dtype=torch.int64)


@pytest.mark.parametrize("kind", ["sjlt", "gaussian"])
def test_factgrass_calls_do_not_change_later_scores(kind):
    """A float32 FactGraSS called first in float64 scores float32 bit for bit as a fresh one (no memo)."""
    fm, (x, y) = _problem("mlp", n=12)
    fm32 = functional_model(fm.module.float(), fm.loss_fn)
    p64 = {k: v.double() for k, v in fm32.params.items()}
    b32, b64 = (x.float(), y), (x.double(), y)
    used, fresh = factgrass(fm32, proj_dim=16, kind=kind), factgrass(fm32, proj_dim=16, kind=kind)
    s64 = used.score(p64, used.prepare(p64, b64), b64, b64)
    assert s64.dtype == torch.float64
    got = used.score(fm32.params, used.prepare(fm32.params, b32), b32, b32)
    want = fresh.score(fm32.params, fresh.prepare(fm32.params, b32), b32, b32)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert float((got.double() - s64).abs().max()) <= 1e-3 * float(s64.abs().max())
