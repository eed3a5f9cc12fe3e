"""Self-scores that are NaN or inf are refused by name everywhere, as ``score`` refuses the same
examples (engineer E2's open problems, stop 24): ``pipeline.stream_self`` scans its diagonal once,
``record_self`` scans each shard before it is written (no NaN record is committed; a rerun on
good data resumes), a store's record is scanned as read back, and LoGra's ``prepare`` refuses
non-finite covariance factors by name instead of a raw ``torch._LinAlgError`` from ``eigh``."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import logra
from dattri_fn.attribute.pipeline import stream_self
from dattri_fn.store import build_store, open_store, record_self, record_store, self_scores


def _rows(batch):
    return batch[0]


def _data(big: bool):
    """float32 rows ``[7, 3]`` in batches of 4 and 3; with ``big``, example 5's row is finite
    (1e20) but its self-dot overflows to inf."""
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    if big:
        x[5] = 1e20
    return [(x[:4],), (x[4:],)], x


def test_stream_self_refuses_an_overflowing_diagonal_by_name():
    train, _ = _data(big=True)
    with pytest.raises(ValueError, match=r"^m\(train=\.\.\.\): expected examples whose "
                                         r"per-example features \(gradients\) are finite, got "
                                         r"NaN or inf in the self-score of example 5\."):
        stream_self(_rows, _rows, train, func="m")


def test_stream_self_finite_values_unchanged():
    """float64: the scan changes no value (row-wise dot of a dense reference, 1e-12)."""
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = stream_self(lambda b: b[0] @ W, lambda b: b[0] @ W * 2, [(x[:4],), (x[4:],)])
    torch.testing.assert_close(got, 2 * ((x @ W) ** 2).sum(1), rtol=1e-12, atol=0)


def _self_dir(path):
    man = json.loads((path / "self" / "manifest.json").read_text())
    return man, [np.load(path / "self" / s["file"]) for s in man["shards"]]


@pytest.mark.parametrize("via", ["record_self", "stream_self"])
def test_recording_commits_no_non_finite_self_record(tmp_path, via):
    """The refusal names the call and example 5, before shard 1 is written: the record stays
    incomplete with only the finite shard 0; a rerun on the corrected data resumes and
    completes, equal to the diagonal from the data."""
    bad, _ = _data(big=True)
    good, x = _data(big=False)
    diag = lambda b: (b[0] * b[0]).sum(1)
    call = ((lambda rec: record_self("m", rec, diag)) if via == "record_self"
            else (lambda rec: stream_self(_rows, _rows, rec, func="m")))
    params = {"w": torch.ones(1)}
    with pytest.raises(ValueError, match=r"^m\(train=\.\.\.\): expected examples whose "
                                         r"per-example .*finite, got NaN or inf in the "
                                         r"self-score of example 5\."):
        call(record_store(tmp_path / "s", bad, params=params))
    man, shards = _self_dir(tmp_path / "s")
    assert not man["complete"] and len(shards) == 1 and np.isfinite(shards[0]).all()
    # the first shard is the same in both: the rerun resumes after it
    got = call(record_store(tmp_path / "s", good, params=params))
    man, shards = _self_dir(tmp_path / "s")
    assert man["complete"] and len(shards) == 2
    torch.testing.assert_close(got, (x * x).sum(1), rtol=0, atol=0)


def test_record_self_with_offset_names_the_global_example(tmp_path):
    bad, _ = _data(big=True)
    seen = []

    def served(b, first):
        seen.append(first)
        return (b[0] * b[0]).sum(1)

    with pytest.raises(ValueError, match=r"self-score of example 5\."):
        record_self("m", record_store(tmp_path / "s", bad, params={"w": torch.ones(1)}), served,
                    with_offset=True)
    assert seen == [0, 4]


def test_a_non_finite_record_is_not_served(tmp_path):
    """A record holding NaN (written otherwise than by record_self) is refused as read back,
    naming the call, the example and the record's path."""
    good, _ = _data(big=False)
    params = {"w": torch.ones(1)}
    rec = record_store(tmp_path / "s", good, params=params)
    record_self("m", rec, lambda b: (b[0] * b[0]).sum(1))
    build_store(tmp_path / "s", _rows, good, params=params)
    man, shards = _self_dir(tmp_path / "s")
    shards[1][2] = np.nan
    np.save(tmp_path / "s" / "self" / man["shards"][1]["file"], shards[1])
    store = open_store(tmp_path / "s")
    with pytest.raises(ValueError, match=r"^m\(train=\.\.\.\): .*NaN or inf in the self-score "
                                         r"of example 6\. The self-scores recorded at .*self"):
        self_scores("m", store)
    with pytest.raises(ValueError, match=r"self-score of example 6\."):
        stream_self(_rows, _rows, store, func="m")


def _overflowing():
    """float32 Linear whose first 3 examples are tame and last 3 give NaN gradients (E2's case)."""
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.fill_(1e30)
        m.bias.zero_()
    fm = functional_model(m.eval(), F.cross_entropy)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(8)) * 1e10
    x[:3] *= 1e-40
    return fm, [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([2, 1, 0]))]


def test_logra_prepare_refuses_non_finite_factors_by_name():
    fm, train = _overflowing()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"^logra\.prepare\(train=\.\.\.\): expected "
                                             r"examples whose per-example layer inputs and "
                                             r"gradients are finite, got NaN or inf in the "
                                             r"output-gradient \(G'\) covariance factor of "
                                             r"layer '' over the 6 examples\."):
            logra(fm, proj_dim=None).prepare(fm.params, train)


def test_logra_eigh_failure_is_named_with_its_cause(monkeypatch):
    """Finite factors whose eigh fails: a ValueError naming train, the LinAlgError its cause."""
    torch.manual_seed(0)
    fm = functional_model(nn.Linear(4, 3).eval(), F.cross_entropy)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    train = [(x, torch.tensor([0, 1, 2, 0, 1, 2]))]

    def failing(*a, **k):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(ValueError, match=r"^logra\.prepare\(train=\.\.\.\): .*a failed eigh "
                                         r"\(linalg\.eigh: The algorithm failed") as info:
        logra(fm, proj_dim=None).prepare(fm.params, train)
    assert isinstance(info.value.__cause__, torch.linalg.LinAlgError)


def test_logra_self_score_refuses_non_finite_by_name():
    """Prepared on the tame examples (no cached rows), self_score streamed over all of them
    names example 3."""
    fm, train = _overflowing()
    M = logra(fm, proj_dim=None, cache_features=False, damping=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = M.prepare(fm.params, train[:1])
        with pytest.raises(ValueError, match=r"^logra\.self_score\(train=\.\.\.\): expected "
                                             r"examples .*finite, got NaN or inf in the "
                                             r"self-score of example 3"):
            M.self_score(fm.params, state, train)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_kfac_influence_self_score_refuses_non_finite_by_name(solver):
    """Prepared on the tame examples, if_kfac/if_ekfac self_score over all six went through
    stream_self unscanned and returned NaN for examples 3-5; now refused by name."""
    fm, train = _overflowing()
    from dattri_fn.attribute import influence

    M = influence(fm, solver=solver, damping=1.0, model=fm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = M.prepare(fm.params, train[:1])
        with pytest.raises(ValueError, match=rf"^if_{solver}\(train=\.\.\.\): expected examples "
                                             r".*finite, got NaN or inf in the self-score of "
                                             r"example 3"):
            M.self_score(fm.params, state, train)


def test_ekfac_prepare_refuses_non_finite_factors_by_name():
    """EK-FAC's eigh on NaN factors raised a raw torch._LinAlgError naming no argument."""
    fm, train = _overflowing()
    from dattri_fn.attribute import influence

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"^if_ekfac\(train=\.\.\.\): expected examples "
                                             r"whose layer inputs and gradients are finite, got "
                                             r"NaN or inf in the output-gradient \(G\) factor of "
                                             r"layer ''\."):
            influence(fm, solver="ekfac", damping=1.0, model=fm).prepare(fm.params, train)
