"""The command line: help texts, error paths (exit 2) and the demo end to end on a small setting."""

import re

import pytest
import torch

from dattri_fn.app.cli import main
from dattri_fn.app.recipes import METHODS


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr()


def test_help_is_complete(capsys):
    """`--help` names both subcommands; `demo --help` documents every option."""
    code, out = _exit_code(["--help"], capsys)
    assert code == 0 and "demo" in out.out and "bench" in out.out
    code, out = _exit_code(["demo", "--help"], capsys)
    assert code == 0
    for option in ("--task", "--methods", "--n-train", "--n-test", "--subsets", "--models",
                   "--device", "--out", "--seed", "--show", "--quiet", "--sgd"):
        assert option in out.out
    flat = re.sub(r"\s+", "", out.out)  # argparse wraps long lines, even inside a name
    assert all(m in flat for m in METHODS)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--methods", "if-cg,nope"], r"unknown method\(s\) \['nope'\]"),
    (["demo", "--task", "cifar"], r"invalid choice: 'cifar'"),
    (["demo", "--device", "tpu"], r"--device: unsupported device type 'tpu'|unknown device"),
    (["demo", "--device", "banana"], r"--device: unknown device 'banana'"),
    # >= 6 since issue 15 (was >= 1): --n-train 1 crashed drawing 3 proponents after all the work
    (["demo", "--n-train", "0"], r"expected an integer >= 6, got '0'"),
    (["demo", "--n-train", "1"], r"--n-train: expected an integer >= 6, got '1': the picture "
                                 r"shows 3 proponents and 3 opponents"),
    (["demo", "--subsets", "2"], r"--subsets: expected an integer >= 5, got '2': the LDS is a "
                                 r"Spearman correlation"),
    (["demo", "--subsets", "4"], r"--subsets: expected an integer >= 5, got '4'"),
    (["demo", "--models", "0"], r"--models: expected an integer >= 1, got '0'"),
    (["demo", "--n-train", "1790", "--n-test", "8"],
     r"--n-train/--n-test: expected n_train \+ n_test <= 1797 \(the bundled digits\), "
     r"got 1790 \+ 8"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    """Unknown method, task or device and bad sizes exit with code 2 and say what is wrong."""
    code, out = _exit_code(argv, capsys)
    assert code == 2 and re.search(message, out.err), out.err


def test_out_naming_a_file_exits_2_before_any_work(tmp_path, capsys):
    """--out naming an existing file (or a path under one): exit 2 with a clear message."""
    afile = tmp_path / "results.txt"
    afile.write_text("keep me")
    code, out = _exit_code(["demo", "--out", str(afile)], capsys)
    assert code == 2 and re.search(r"--out: expected a folder .* got '.*results.txt', an "
                                   r"existing file", out.err), out.err
    code, out = _exit_code(["demo", "--out", str(afile / "sub")], capsys)
    assert code == 2 and "--out: cannot create the folder" in out.err, out.err
    assert afile.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cuda_without_gpu_exits_2(capsys):
    """--device cuda on a machine without CUDA: exit 2, not a traceback."""
    code, out = _exit_code(["demo", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in out.err


def test_no_command_prints_help(capsys):
    """No subcommand: help on stdout, exit status 2."""
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """A small demo run prints an LDS table for every method and writes a non-empty PNG."""
    methods = ["if-cg", "grad-dot", "tracin", "trak", "rps"]
    assert main(["demo", "--task", "digits-lr", "--n-train", "80", "--n-test", "6",
                 "--subsets", "6", "--models", "2", "--methods", ",".join(methods),
                 "--out", str(tmp_path), "--show", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    for m in methods:
        row = re.search(rf"^\| {m} \| (-?[0-9.]+) \|", out, flags=re.M)
        assert row, out
        assert -1.0 <= float(row.group(1)) <= 1.0
    png = tmp_path / "attributions.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text().startswith("digits-lr")
    assert "wrote" in out


@pytest.mark.slow
def test_demo_magic_through_the_sgd_run(tmp_path, capsys):
    """`demo --sgd --methods magic,grad-dot`: MAGIC scores the SGD run, both rows in the table,
    each LDS in [-1, 1]."""
    assert main(["demo", "--task", "digits-mlp", "--sgd", "--n-train", "60", "--n-test", "4",
                 "--subsets", "5", "--models", "1", "--methods", "magic,grad-dot",
                 "--out", str(tmp_path), "--show", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    for m in ("magic", "grad-dot"):
        row = re.search(rf"^\| {m} \| (-?[0-9.]+) \|", out, flags=re.M)
        assert row, out
        assert -1.0 <= float(row.group(1)) <= 1.0
