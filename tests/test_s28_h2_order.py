"""Review RH on engineer H's order check: ``iter(loader)`` in a one-pass scan is checked like the
loader (MED-1), sequential samplers given as a range/list/tensor pass, DistributedSampler's refusal
points to the sharding helpers (LOW-3), and LinOp refuses a non-finite scalar (LOW-5)."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from dattri_fn import LinOp, _checks, _order
from dattri_fn.attribute import collect, stream_scores

F64 = torch.float64
ORDER = r"stream_scores\(train=...\): expected the training rows in a fixed order"


def _data(n=40):
    torch.manual_seed(0)
    x = torch.randn(n, 4, dtype=F64)
    return x, TensorDataset(x)


def _scan(train, x):
    return stream_scores(lambda b: b[0], train, x[:2], top_k=3)


def test_iterator_of_a_shuffled_loader_is_refused_in_a_top_k_scan():
    # mutation: check_order dropped from iter_batches' once branch -> accepted, indices shuffled
    x, ds = _data()
    with pytest.raises(ValueError, match=ORDER + r".*an iterator of a DataLoader with shuffle=True"):
        _scan(iter(DataLoader(ds, batch_size=8, shuffle=True)), x)


def test_iterator_of_a_row_dropping_or_started_loader_is_refused():
    x, ds = _data()
    with pytest.raises(ValueError, match=r"got 32 examples of the 40 \(drop_last=True"):
        _scan(iter(DataLoader(ds, batch_size=16, drop_last=True)), x)
    it = iter(DataLoader(ds, batch_size=8))
    next(it)
    with pytest.raises(ValueError, match=r"already given 1 batch\(es\).*fresh iter\(loader\)"):
        _scan(it, x)


def test_iterator_of_a_sequential_loader_streams_and_matches_the_list():
    x, ds = _data()
    ref = _scan([(x,)], x)
    got = _scan(iter(DataLoader(ds, batch_size=8)), x)
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.values, ref.values)
    gen = (b for b in DataLoader(ds, batch_size=8))  # a generator's order is taken as given
    assert torch.equal(_scan(gen, x).indices, ref.indices)


@pytest.mark.parametrize("sampler", [range(10), list(range(10)), tuple(range(10)),
                                     torch.arange(10)], ids=["range", "list", "tuple", "tensor"])
def test_sequential_sampler_as_a_sequence_is_accepted(sampler):
    # mutation: _in_order returning False for non-SequentialSampler -> refused as before
    x, ds = _data(10)
    got = collect(lambda b: b[0], DataLoader(ds, batch_size=4, sampler=sampler))
    assert torch.equal(got, x)


@pytest.mark.parametrize("sampler", [range(1, 10), range(9, -1, -1), list(range(9)) + [0],
                                     [9] + list(range(9)), torch.arange(9, -1, -1), range(9)],
                         ids=["from1", "reversed", "repeat", "rotated", "tensor_rev", "short"])
def test_other_sequences_are_refused(sampler):
    _, ds = _data(10)
    with pytest.raises(ValueError, match=r"collect\(data=...\): expected the rows in a fixed "
                       r"order.*has an order this check cannot read.*__iter__ builds the batches"):
        collect(lambda b: b[0], DataLoader(ds, batch_size=4, sampler=sampler))


def test_distributed_sampler_points_to_the_sharding_helpers():
    _, ds = _data(10)
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(ValueError, match=r"sampler DistributedSampler gives one process a part "
                       r".*dattri_fn\.distributed\.shard_data\(data\).*row_offset") as e:
        collect(lambda b: b[0], DataLoader(ds, batch_size=4, sampler=sampler))
    assert "shuffle=False" not in str(e.value)


def test_one_message_helper():
    assert _checks._msg is _order._msg


@pytest.mark.parametrize("make", [
    lambda op: op * torch.tensor(float("nan")), lambda op: op * float("inf"),
    lambda op: op / torch.tensor(float("nan")), lambda op: op + torch.tensor(float("inf")),
    lambda op: op - float("nan"), lambda op: float("-inf") * op],
    ids=["mul_nan0d", "mul_inf", "div_nan0d", "add_inf0d", "sub_nan", "rmul_ninf"])
def test_linop_refuses_a_non_finite_scalar(make):
    # mutation: the isfinite check in _types._scalar removed -> a NaN operator, accepted
    op = LinOp.identity(3, F64)
    with pytest.raises(ValueError, match=r"LinOp\.__\w+__\((c|other)=...\): expected a finite "
                       r"number, got -?(nan|inf)"):
        make(op)


def test_linop_zero_divisor_refused_and_finite_scalars_unchanged():
    op = LinOp.identity(3, F64)
    with pytest.raises(ZeroDivisionError, match=r"LinOp\.__truediv__\(c=...\): expected c != 0"):
        op / torch.tensor(0.0)
    v = torch.arange(3.0, dtype=F64)[None]
    assert torch.equal((op * 2.5)(v), v * 2.5) and torch.equal((op + 1)(v), v + v)


def test_check_method_skip_warning_names_the_argument():
    # review RH LOW-7: the house form names the argument (was check_method(<method name>))
    from dattri_fn.attribute import influence
    from dattri_fn.testing import check_method, logistic_regression

    p = logistic_regression(n=12, seed=1)
    m = influence(p.loss, solver="explicit", damping=1e-3)
    with pytest.warns(UserWarning, match=r"^check_method\(problem=...\): skipped the exact "
                      r"leave-one-out property of \w+, the one that catches a wrong inverse"):
        check_method(m, p)
