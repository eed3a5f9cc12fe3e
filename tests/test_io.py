"""Atomic save/load: round trips (tensors, NamedTuples, containers), failed and killed writes,
stale temp files and file modes."""

import os
import signal
import stat
import subprocess
import sys
import time
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn import io
from dattri_fn.eval.metrics import LDSResult
from dattri_fn.io import fcntl


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


# -- temp files and modes ---------------------------------------------------------------
posix_only = pytest.mark.skipif(fcntl is None, reason="flock and POSIX modes")
LEFTOVER = ".obj.pt.ab12cd_9.tmp"  # what a save of obj.pt killed mid-write leaves behind
# Near misses that are not obj.pt's temp files: they must survive every save and load.
OTHERS = [".obj.pt.tmp", ".obj.pt.ab12cd9.tmp", ".obj.pt.AB12CD_9.tmp", ".obj.pt.ab12cd_9x.tmp",
          ".other.pt.ab12cd_9.tmp", ".obj.pt.ab12cd_9.ab12cd_9.tmp", "obj.pt.ab12cd_9.tmp",
          ".obj.pt.ab12cd_9.tmp.keep", ".obj.ab12cd_9.tmp", "notes.txt"]


@pytest.mark.parametrize("op", ["save", "load"])
def test_next_save_or_load_removes_leftover_temp_only(tmp_path, op):
    """A leftover .obj.pt.XXXXXXXX.tmp is removed by the next save/load of obj.pt; nothing else."""
    path = tmp_path / "obj.pt"
    torch.save(torch.arange(3), path)  # as an earlier process left it
    for name in [LEFTOVER, *OTHERS]:
        (tmp_path / name).write_bytes(b"partial")
    if op == "save":
        io.save(torch.arange(4), path)
    assert torch.equal(io.load(path), torch.arange(4 if op == "save" else 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["obj.pt", *OTHERS])
    assert (tmp_path / "notes.txt").read_bytes() == b"partial"


@posix_only
def test_temp_held_by_a_live_writer_is_kept(tmp_path):
    """A temp file whose writer still holds its flock is not stale: kept until it is released."""
    path = tmp_path / "obj.pt"
    tmp = tmp_path / LEFTOVER
    with open(tmp, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        io.save(torch.zeros(1), path)
        io.load(path)
        assert tmp.exists()
    io.load(path)
    assert not tmp.exists()


def test_clean_directory_is_listed_once(tmp_path, monkeypatch):
    """Saves and loads into a directory with no temp file list it once, until it changes."""
    calls = []
    real_scandir = io.os.scandir
    monkeypatch.setattr(io.os, "scandir", lambda d: calls.append(d) or real_scandir(d))
    for i in range(5):
        io.save(torch.tensor(i), tmp_path / f"u{i}.pt")
    for i in range(5):
        assert io.load(tmp_path / f"u{i}.pt") == i
    assert len(calls) == 1
    time.sleep(0.05)  # past the file system clock's tick (a coarse one is <= 10 ms on Linux)
    (tmp_path / ".u3.pt.zzzzzzzz.tmp").write_bytes(b"")  # changes the directory's mtime
    io.load(tmp_path / "u3.pt")
    assert len(calls) == 2 and not (tmp_path / ".u3.pt.zzzzzzzz.tmp").exists()


@posix_only
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_mode_follows_umask(tmp_path, umask):
    """Written files get 0o666 & ~umask (0644 by default), new or replacing a 0600 file."""
    old = os.umask(umask)
    try:
        io.save(torch.zeros(1), tmp_path / "new.pt")
        (tmp_path / "old.pt").write_bytes(b"")
        os.chmod(tmp_path / "old.pt", 0o600)
        io.save(torch.zeros(1), tmp_path / "old.pt")
    finally:
        os.umask(old)
    for name in ("new.pt", "old.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask


@posix_only
def test_sigkilled_writer_leftover_removed_by_next_save(tmp_path):
    """A writer SIGKILLed mid-write leaves its locked temp; while alive it is kept, then removed."""
    path = tmp_path / "obj.pt"
    io.save(torch.zeros(1), path)
    child = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        temps = [p for p in tmp_path.iterdir() if p.name != "obj.pt"]
        assert len(temps) == 1 and temps[0].name.startswith(".obj.pt.")
        io.save(torch.ones(1), path)  # the writer is alive: its temp stays
        assert temps[0].exists()
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    io.save(torch.full((1,), 2.0), path)
    assert [p.name for p in tmp_path.iterdir()] == ["obj.pt"]
    assert io.load(path).item() == 2.0


# A save that writes part of its file, says so, and hangs until killed.
_STUCK_WRITER = """
import sys, time, torch
from dattri_fn import io

def stuck(obj, f, *args, **kwargs):
    f.write(b"partial")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

torch.save = stuck
io.save({"x": torch.zeros(3)}, sys.argv[1])
"""


# -- temp files of targets never written again; atomic_path ----------------------------
def test_clean_temps_removes_every_targets_leftovers_only(tmp_path):
    """clean_temps removes the unlocked temp files of every target (a target never saved again
    kept them before) and nothing that is not one of our temp names."""
    leftovers = [LEFTOVER, ".other.pt.ab12cd_9.tmp", ".shard-000003.npy.zz99aa__.tmp"]
    keep = [".obj.pt.tmp", ".obj.pt.ab12cd9.tmp", ".obj.pt.AB12CD_9.tmp", "obj.pt.ab12cd_9.tmp",
            ".obj.pt.ab12cd_9.tmp.keep", ".ab12cd_9.tmp", "notes.txt"]
    for name in leftovers + keep:
        (tmp_path / name).write_bytes(b"partial")
    assert io.clean_temps(tmp_path) == len(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert io.clean_temps(tmp_path / "missing") == 0
    with pytest.raises(TypeError, match=r"clean_temps\(directory=...\): expected a str"):
        io.clean_temps(3)


@posix_only
def test_clean_temps_keeps_a_live_writers_temp(tmp_path):
    """A temp whose writer holds its flock survives clean_temps until released."""
    tmp = tmp_path / LEFTOVER
    with open(tmp, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert io.clean_temps(tmp_path) == 0 and tmp.exists()
    assert io.clean_temps(tmp_path) == 1 and not tmp.exists()


def test_atomic_path_renames_on_success_removes_on_error(tmp_path):
    """atomic_path: the target appears whole on a clean exit; an exception leaves the old file
    and no temp."""
    path = tmp_path / "a.bin"
    with io.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.") and not path.exists()
        tmp.write_bytes(b"first")
    assert path.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="stop"), io.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("stop")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    with pytest.raises(TypeError, match=r"atomic_path\(path=...\): expected a str"):
        with io.atomic_path(None):
            pass
