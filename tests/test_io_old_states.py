"""Files saved by an older version: a NamedTuple that has since gained defaulted fields loads as
its class (K-FAC/EK-FAC factors saved before their ``diagonal`` field, stop 20)."""

import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import io
from dattri_fn.operators.kfac import (
    EKFACFactors,
    KFACFactors,
    ekfac_factors,
    ihvp_ekfac,
    ihvp_kfac,
    kfac_factors,
)

OLD = Path(__file__).parent / "data" / "kfac_states_before_diagonal.pt"


def problem():
    """The model, params and data the old file's factors were built on (its generator script,
    tests/data/make_kfac_states_before_diagonal.py, imports this)."""
    g = torch.Generator().manual_seed(20)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    return net, {k: v.detach() for k, v in net.named_parameters()}, (x, y)


def test_kfac_states_saved_before_diagonal_load_as_their_classes():
    """A 5-field KFACFactors / 6-field EKFACFactors file (old code) = the current factors, with
    diagonal={}: types, fields and (F + 0.1 I)^-1 v equal to the fresh state's at 1e-12."""
    raw = torch.load(OLD, weights_only=True)
    assert "diagonal" not in raw["kfac"]["fields"] and "diagonal" not in raw["ekfac"]["fields"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = io.load(OLD)
    assert type(old["kfac"]) is KFACFactors and type(old["ekfac"]) is EKFACFactors
    assert old["kfac"].diagonal == {} and old["ekfac"].diagonal == {}
    net, params, data = problem()
    new = {"kfac": kfac_factors(net, F.cross_entropy, params, data),
           "ekfac": ekfac_factors(net, F.cross_entropy, params, data)}
    v = torch.randn(3, sum(p.numel() for p in params.values()),
                    generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for kind, inv in (("kfac", ihvp_kfac), ("ekfac", ihvp_ekfac)):
        assert old[kind].param_names == new[kind].param_names
        assert int(old[kind].num_examples) == int(new[kind].num_examples)
        torch.testing.assert_close(inv(old[kind], damping=0.1).matmat(v),
                                   inv(new[kind], damping=0.1).matmat(v), rtol=1e-12, atol=1e-12)


class _Grown(NamedTuple):
    a: torch.Tensor
    b: int = 3
    c: tuple = ()


class _Required(NamedTuple):
    a: torch.Tensor
    b: int


def _saved(tmp_path, cls, fields: dict) -> Path:
    """A file holding ``cls`` encoded with exactly ``fields`` (as a version with them saved)."""
    path = tmp_path / "x.pt"
    torch.save({io.TAG: f"{cls.__module__}:{cls.__qualname__}", "fields": fields}, path)
    return path


@pytest.mark.parametrize("fields", [("a",), ("a", "b")])
def test_prefix_of_fields_with_defaults_rebuilds_the_class(tmp_path, fields):
    """Saved fields = a prefix of the class's, the rest defaulted: the class, defaults filled."""
    saved = {f: torch.ones(2) if f == "a" else 7 for f in fields}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = io.load(_saved(tmp_path, _Grown, saved))
    assert type(back) is _Grown and torch.equal(back.a, torch.ones(2))
    assert back.b == (7 if "b" in fields else 3) and back.c == ()


@pytest.mark.parametrize(("cls", "fields"), [
    (_Required, ("a",)),        # the missing field has no default
    (_Grown, ("a", "c")),       # not a prefix (b skipped)
    (_Grown, ("a", "b", "c", "d")),  # more fields than the class
])
def test_other_field_sets_come_back_adhoc(tmp_path, cls, fields):
    """Fields that are not a defaulted prefix of the class's: the ad-hoc namedtuple, warned."""
    saved = {f: 1 for f in fields}
    with pytest.warns(UserWarning, match="cannot import NamedTuple"):
        back = io.load(_saved(tmp_path, cls, saved))
    assert type(back) is not cls and back._fields == fields
