"""ekfac_factors_sharded(others=...): the params outside the Kronecker layers in a one-process
gloo group (the all-reduce an identity: equal to ekfac_factors bit for bit), and the call
sequence of ``reduce`` (one call per pass, keys prefixed by pass)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import distributed as D
from dattri_fn.operators.kfac import ekfac_factors

DT = torch.float64
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _problem():
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    x, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)
    return net, {k: v.detach() for k, v in net.named_parameters()}, (x, y)


@pytest.fixture
def one_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_ekfac_takes_others(one_process_group):
    """others='diagonal': no warning, factors (Kronecker and D) equal ekfac_factors' bit for bit;
    others='error': refused naming the LayerNorm keys; None: the one warning."""
    net, params, data = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = D.ekfac_factors_sharded(net, F.cross_entropy, params, [data], others="diagonal")
    ref = ekfac_factors(net, F.cross_entropy, params, [data], others="diagonal")
    assert list(f.diagonal) == ["1.weight", "1.bias"] and list(f.QA) == ["0", "2"]
    for field in ("QA", "QG", "Lambda", "diagonal"):
        assert all(torch.equal(getattr(f, field)[k], getattr(ref, field)[k])
                   for k in getattr(ref, field))
    with pytest.raises(ValueError, match=r"ekfac_factors\(params=...\): expected only weights/"
                                         r"biases.*\['1.weight', '1.bias'\]"):
        D.ekfac_factors_sharded(net, F.cross_entropy, params, [data], others="error")
    with pytest.warns(UserWarning, match=r"2 params are outside the Kronecker"):
        D.ekfac_factors_sharded(net, F.cross_entropy, params, [data])


def test_reduce_is_called_once_per_pass_with_prefixed_keys():
    """ekfac_factors' reduce: A/G sums with each layer's R count (the decisions that move a
    layer to the diagonal block), then D (params outside the Kronecker layers), then Lambda;
    an identity reduce gives the factors of reduce=None bit for bit."""
    net, params, data = _problem()
    seen = []

    def reduce(sums, count):
        seen.append(sorted({k.partition(":")[0] for k in sums}))
        return sums, count

    f = ekfac_factors(net, F.cross_entropy, params, data, others="diagonal", reduce=reduce)
    assert seen == [["A", "G", "R"], ["D"], ["L"]]
    ref = ekfac_factors(net, F.cross_entropy, params, data, others="diagonal")
    assert all(torch.equal(f.diagonal[k], ref.diagonal[k]) for k in ref.diagonal)
    assert all(torch.equal(f.Lambda[k], ref.Lambda[k]) for k in ref.Lambda)


def test_all_reduce_kfac_refuses_ranks_with_other_layers(one_process_group, monkeypatch):
    """all_reduce_kfac: in a one-process group the factors come back equal (weight n/N = 1);
    with a (simulated) second rank whose factors lack a layer, every rank is refused naming
    factors and the differing keys before any per-key all-reduce (review R1 F3: such ranks
    paired the wrong tensors or hung)."""
    from dattri_fn.operators.kfac import kfac_factors

    net, params, data = _problem()
    f = kfac_factors(net, F.cross_entropy, params, [data], others="diagonal")
    same = D.all_reduce_kfac(f)
    assert all(torch.equal(same.A[k], f.A[k]) and torch.equal(same.G[k], f.G[k]) for k in f.A)
    other = f._replace(A={"0": f.A["0"]}, G={"0": f.G["0"]})  # rank 1 moved layer '2'
    reduced = []

    def gather(out, obj, group=None):  # rank 0's layout, then the other rank's
        out[0] = obj
        out[1] = (obj[0], tuple((fd, k, tuple(v.shape)) for fd in ("A", "G", "diagonal")
                                for k, v in getattr(other, fd).items()))

    monkeypatch.setattr(D, "rank_and_world", lambda group=None: (0, 2))
    monkeypatch.setattr(D.dist, "all_gather_object", gather)
    monkeypatch.setattr(D.dist, "all_reduce", lambda *a, **k: reduced.append(a))
    with pytest.raises(ValueError, match=r"all_reduce_kfac\(factors=\.\.\.\): expected factors of "
                                         r"the same layers.*ranks \[1\] differ.*'2'"):
        D.all_reduce_kfac(f)
    assert reduced == []
