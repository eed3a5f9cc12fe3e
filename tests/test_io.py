"""Atomic save/load: round trips (tensors, NamedTuples, containers) and failed writes."""

from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn import io
from dattri_fn.metrics import LDSResult


class State(NamedTuple):
    a: torch.Tensor
    b: dict


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), k=st.integers(1, 4))
def test_roundtrip_nested(tmp_path_factory, device, seed, n, k):
    """load(save(x)) == x for nested NamedTuples / dicts / lists / tuples of tensors."""
    g = torch.Generator().manual_seed(seed)
    obj = {
        "state": State(torch.randn(n, k, generator=g, dtype=torch.float64).to(device),
                       {"idx": torch.randint(0, 9, (n,), generator=g), "name": "x", "v": 1.5}),
        "list": [torch.rand(k, generator=g) > 0.5, None, 3],
        "tuple": (torch.randn(k, generator=g, dtype=torch.float64), "s"),
    }
    path = tmp_path_factory.mktemp("io") / "obj.pt"
    io.save(obj, path)
    back = io.load(path)
    assert isinstance(back["state"], State)
    assert torch.equal(back["state"].a, obj["state"].a)
    assert back["state"].a.device == obj["state"].a.device
    assert torch.equal(back["state"].b["idx"], obj["state"].b["idx"])
    assert back["state"].b["name"] == "x" and back["state"].b["v"] == 1.5
    assert torch.equal(back["list"][0], obj["list"][0]) and back["list"][1:] == [None, 3]
    assert isinstance(back["tuple"], tuple) and torch.equal(back["tuple"][0], obj["tuple"][0])


def test_library_namedtuple_roundtrip(tmp_path, device):
    """A library result (LDSResult with a nested tuple) comes back as the same class."""
    r = LDSResult(torch.tensor(0.5, device=device), torch.arange(3.0, device=device),
                  (torch.tensor(0.1), torch.tensor(0.9)))
    io.save(r, tmp_path / "r.pt")
    back = io.load(tmp_path / "r.pt", map_location="cpu")
    assert type(back) is LDSResult
    assert torch.equal(back.per_test, r.per_test.cpu()) and back.ci95[1] == 0.9


def test_unknown_namedtuple_rebuilt_adhoc(tmp_path):
    """A NamedTuple whose class cannot be imported comes back with the same fields, warned."""
    class Gone(NamedTuple):
        x: torch.Tensor

    Gone.__module__ = "no_such_module_xyz"
    io.save(Gone(torch.ones(2)), tmp_path / "g.pt")
    with pytest.warns(UserWarning, match="cannot import NamedTuple"):
        back = io.load(tmp_path / "g.pt")
    assert back._fields == ("x",) and torch.equal(back.x, torch.ones(2))


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    """A torch.save that dies half-way leaves the previous file byte-identical, no temp left."""
    path = tmp_path / "keep.pt"
    io.save({"v": torch.arange(5)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        io.save({"v": torch.arange(7)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(io.load(path)["v"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]


def test_overwrite_replaces(tmp_path):
    """save over an existing file replaces it atomically: load returns the new object."""
    io.save(torch.zeros(2), tmp_path / "a.pt")
    io.save(torch.ones(3), tmp_path / "a.pt")
    assert torch.equal(io.load(tmp_path / "a.pt"), torch.ones(3))


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    """load uses weights_only=True: a pickled arbitrary class is refused."""
    torch.save({"obj": _Opaque()}, tmp_path / "o.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        io.load(tmp_path / "o.pt")


class _Opaque:
    pass


def test_errors(tmp_path):
    """Wrong kinds of path and missing files raise errors naming the argument."""
    with pytest.raises(TypeError, match=r"save\(path=...\): expected a str or os.PathLike"):
        io.save(1, 3)
    with pytest.raises(TypeError, match=r"load\(path=...\)"):
        io.load(None)
    with pytest.raises(FileNotFoundError, match=r"load\(path=...\): expected an existing file"):
        io.load(tmp_path / "missing.pt")
