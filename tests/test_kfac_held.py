"""EK-FAC's Lambda from the K-FAC pass's held (a, g): one pass over the data fewer, the same
factors bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.operators import kfac_stats
from dattri_fn.operators.kfac import ekfac_factors

DT = torch.float64


class _Seq(nn.Module):
    """Tokens [B, T, 3] -> Linear -> tanh -> Linear -> mean over T: T > 1 blocks."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


def _model(seq: bool):
    torch.manual_seed(0)
    net = (_Seq() if seq else nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))).double()
    return net, {k: v.detach() for k, v in net.named_parameters()}


def _data(seq: bool):
    g = torch.Generator().manual_seed(1)
    shape = (3, 3) if seq else (4,)
    return [(torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g))
            for n in (5, 4, 3)]


def _count_passes(monkeypatch):
    calls, real = [], kfac_stats._passes
    monkeypatch.setattr(kfac_stats, "_passes", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_held_lambda_equals_second_pass(seq, fisher, chunk_size, monkeypatch):
    """Lambda = E[(Q_G^T DW_n Q_A)^2] from the held (a, g) equals the second pass's
    (torch.equal; a true Fisher's draws restart from its seed), with one pass instead of two."""
    net, params = _model(seq)
    kw = dict(chunk_size=chunk_size, fisher=fisher, seed=3)
    calls = _count_passes(monkeypatch)
    held = ekfac_factors(net, F.cross_entropy, params, _data(seq), **kw)
    assert len(calls) == 1
    monkeypatch.setattr(kfac_stats, "_HELD_ENTRIES", 0)  # nothing held: the second pass
    two = ekfac_factors(net, F.cross_entropy, params, _data(seq), **kw)
    assert len(calls) == 3
    for a, b in zip(held[:3], two[:3], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(held.num_examples, two.num_examples)


def test_over_budget_falls_back(monkeypatch):
    """Past _HELD_ENTRIES mid-pass the held rows are dropped and Lambda comes from a second
    pass: the same factors (torch.equal) as with everything held."""
    net, params = _model(False)
    full = ekfac_factors(net, F.cross_entropy, params, _data(False))
    monkeypatch.setattr(kfac_stats, "_HELD_ENTRIES", 60)  # the first batch's a, g only
    calls = _count_passes(monkeypatch)
    part = ekfac_factors(net, F.cross_entropy, params, _data(False))
    assert len(calls) == 2
    assert all(torch.equal(full.Lambda[k], part.Lambda[k]) for k in full.Lambda)


def test_reduce_keeps_two_passes(monkeypatch):
    """With ``reduce`` (distributed sums) Lambda's local count comes from its own pass: two
    passes, factors equal to the identity reduce's (torch.equal)."""
    net, params = _model(False)
    calls = _count_passes(monkeypatch)
    red = ekfac_factors(net, F.cross_entropy, params, _data(False), reduce=lambda s, n: (s, n))
    assert len(calls) == 2
    plain = ekfac_factors(net, F.cross_entropy, params, _data(False))
    assert all(torch.equal(red.Lambda[k], plain.Lambda[k]) for k in red.Lambda)


class _Pooled(torch.nn.Module):
    """A head on h[:, 0] (CLS pooling): its captured input is a view of the whole [B, S, d]."""

    def __init__(self):
        super().__init__()
        self.emb, self.cls = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.cls(torch.tanh(self.emb(x))[:, 0])


def test_held_inputs_own_their_storage(monkeypatch):
    """The replay holds the head's [b, 8] inputs, not views keeping each [b, 200, 8] hidden state
    alive (the budget counts entries held); Lambda still equals the two-pass one (torch.equal)."""
    import torch.nn.functional as F

    from dattri_fn.operators import kfac_stats as ks
    from dattri_fn.operators.kfac import ekfac_factors

    torch.manual_seed(0)
    net = _Pooled().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 200, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    data = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    params = {k: v.detach() for k, v in net.named_parameters() if k.startswith("cls")}
    real, seen = ks._kfac_sums, []

    def spy(*a, **k):
        out = real(*a, **k)
        held = k.get("held", a[9] if len(a) > 9 else None)
        if held:
            seen.extend(t for item in held if item for t in item[1:])
        return out

    monkeypatch.setattr(ks, "_kfac_sums", spy)
    one = ekfac_factors(net, F.cross_entropy, params, data)
    assert seen and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in seen)
    monkeypatch.setattr(ks, "_HELD_ENTRIES", 0)
    two = ekfac_factors(net, F.cross_entropy, params, data)
    assert all(torch.equal(one.Lambda[k], two.Lambda[k]) for k in one.Lambda)
