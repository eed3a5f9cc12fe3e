"""Feature stores: kill/resume bit-identity, refusal of mismatched requests, store-backed scoring."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dattri_fn.attribute import grad_dot, tracin
from dattri_fn.attribute.pipeline import collect, stream_scores, stream_self
from dattri_fn.store import FeatureStore, build_store, open_store, params_hash, record_store
from dattri_fn.transforms.grad import per_sample_grad
from problems import PROBLEMS, dense_per_sample_grads

HERE = Path(__file__).parent
WRITER = HERE / "_store_writer.py"
CONFIG = {"method": "grad_dot", "proj_dim": None, "seed": 0}


def _temps(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob("*.tmp"))


def _same_store(a: Path, b: Path) -> None:
    """Every shard byte and the manifest of store ``a`` equal those of ``b``."""
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma == mb
    assert ma["complete"]
    for shard in ma["shards"]:
        assert (a / shard["file"]).read_bytes() == (b / shard["file"]).read_bytes()
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def _fails_third(fn, calls: list):
    """``fn`` that records each call in ``calls`` and raises on the third (a crash mid-store)."""

    def failing(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return fn(batch)

    return failing


def _split(batch, size):
    x, y = batch
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def _problem(n=20, n_test=5, seed=0):
    params, loss, train = PROBLEMS["mlp"](n=n, seed=seed)
    _, _, test = PROBLEMS["mlp"](n=n_test, seed=seed + 1)
    return params, loss, _split(train, 6), test


def _features(params, loss):
    return lambda batch: per_sample_grad(loss, params, batch)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer forks its kill targets")
def test_sigkill_at_random_moments_resumes_bit_identical(tmp_path):
    """A store whose writer is SIGKILLed at 5 seeded random moments, then resumed, equals an
    uninterrupted one byte for byte (shards and manifest), with no temp file left."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    # One subprocess imports torch once and forks the writers (a fresh interpreter per kill
    # costs ~4 s here); each kill lands within 12% of the uninterrupted build time, so five
    # cannot finish it: they fall inside shard writes, between a shard's rename and the
    # manifest's, or in a gradient, wherever the seeded draw puts them.
    run = subprocess.run([sys.executable, str(WRITER), str(tmp_path), "17", "5"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["signals"] == [0] + [signal.SIGKILL] * 5 + [0], report
    assert report["committed"] == sorted(report["committed"])  # no committed work is lost
    assert report["committed"][-1] < 48  # the last run really had work left
    assert _temps(tmp_path / "killed") == []
    _same_store(tmp_path / "killed", tmp_path / "ref")


def test_failed_build_resumes_from_last_shard(tmp_path):
    """A build that raises in shard 2 resumes there (shards 0-1 not recomputed) and equals an
    uninterrupted build byte for byte; a leftover temp file of a killed writer is removed."""
    params, loss, train, _ = _problem()
    f = _features(params, loss)
    build_store(tmp_path / "ref", f, train, params=params, config=CONFIG)
    calls = []
    failing = _fails_third(f, calls)

    with pytest.raises(RuntimeError, match="boom"):
        build_store(tmp_path / "s", failing, train, params=params, config=CONFIG)
    leftover = tmp_path / "s" / ".shard-000002.npy.ab12cd_9.tmp"  # as a SIGKILLed save leaves it
    leftover.write_bytes(b"partial")
    calls.clear()
    counted = lambda b: (calls.append(1), f(b))[1]
    store = build_store(tmp_path / "s", counted, train, params=params, config=CONFIG)
    assert len(calls) == len(train) - 2
    assert _temps(tmp_path / "s") == []
    _same_store(tmp_path / "s", tmp_path / "ref")
    assert store.n_rows == 20
    torch.testing.assert_close(store.read(), collect(f, train), rtol=0, atol=0)


def test_complete_store_rebuilt_computes_nothing(tmp_path):
    """Building a complete store again only re-hashes the data: feature_fn is never called."""
    params, loss, train, _ = _problem()
    build_store(tmp_path, _features(params, loss), train, params=params, config=CONFIG)

    def never(batch):
        raise AssertionError("features recomputed")

    assert build_store(tmp_path, never, train, params=params, config=CONFIG).n_rows == 20


def test_mismatched_requests_refused_naming_the_field(tmp_path):
    """A store is never reused for other params, config, data, data order or shard size."""
    params, loss, train, _ = _problem()
    f = _features(params, loss)
    build_store(tmp_path, f, train, params=params, config=CONFIG)
    other = {k: v + 1e-9 for k, v in params.items()}
    with pytest.raises(ValueError, match=r"build_store\(params=...\): expected the store's params_hash"):
        build_store(tmp_path, f, train, params=other, config=CONFIG)
    with pytest.raises(ValueError, match=r"build_store\(config=...\): expected the store's "
                                         r"config\['proj_dim'\] = None, got config\['proj_dim'\] = 64"):
        build_store(tmp_path, f, train, params=params, config=dict(CONFIG, proj_dim=64))
    with pytest.raises(ValueError, match=r"config\['kind'\] = '<absent>'"):
        build_store(tmp_path, f, train, params=params, config=dict(CONFIG, kind="sjlt"))
    with pytest.raises(ValueError, match=r"build_store\(data=...\): expected the rows of shard 1"):
        build_store(tmp_path, f, [train[0], train[2], train[1], train[3]], params=params, config=CONFIG)
    with pytest.raises(ValueError, match=r"build_store\(data=...\): expected the store's 4 shards"):
        build_store(tmp_path, f, train[:3], params=params, config=CONFIG)
    with pytest.raises(ValueError, match=r"build_store\(shard_rows=...\)"):
        build_store(tmp_path, f, train, params=params, config=CONFIG, shard_rows=12)
    with pytest.raises(ValueError, match=r"open_store\(params=...\)"):
        open_store(tmp_path, params=other)
    with pytest.raises(ValueError, match=r"open_store\(config=...\): expected the store's config\['seed'\]"):
        open_store(tmp_path, config=dict(CONFIG, seed=1))
    assert open_store(tmp_path, params=params, config=CONFIG).n_rows == 20


def test_partial_store_refused_by_open(tmp_path):
    """open_store refuses a store whose build has not finished, and a directory with none."""
    params, loss, train, _ = _problem()

    def failing(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_store(tmp_path / "s", failing, train, params=params, config=CONFIG)
    with pytest.raises(ValueError, match=r"open_store\(path=...\): expected a complete store, got one "
                                         r"with 0 committed shards"):
        open_store(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match=r"open_store\(path=...\)"):
        open_store(tmp_path / "none")


def test_grad_dot_from_store_reads_no_training_data(tmp_path):
    """Grad-Dot through record_store, then open_store with new test points, equals G_train G_test^T
    (autograd loop) to 1e-12; the second run is given no training data at all."""
    params, loss, train, test = _problem()
    _, _, test2 = PROBLEMS["mlp"](n=4, seed=9)
    m = grad_dot(loss)
    whole = (torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]))
    G = dense_per_sample_grads(params, loss, whole)
    rec = record_store(tmp_path, train, params=params, config=CONFIG)
    S = m.score(params, (), rec, test)
    torch.testing.assert_close(S, G @ dense_per_sample_grads(params, loss, test).T, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, m.score(params, (), train, test), rtol=0, atol=1e-12)
    store = open_store(tmp_path, params=params, config=CONFIG)
    S2 = m.score(params, (), store, test2)
    torch.testing.assert_close(S2, G @ dense_per_sample_grads(params, loss, test2).T, rtol=0,
                               atol=1e-12)
    top = m.score(params, (), store._replace(block_rows=3), test2, top_k=4)
    ref = m.score(params, (), train, test2, top_k=4)
    assert torch.equal(top.indices, ref.indices)
    torch.testing.assert_close(top.values, ref.values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"grad_dot\(train=...\): expected a store with its "
                                         r"self-scores recorded"):
        m.self_score(params, (), store)


def test_scores_memmap_finalised_atomically(tmp_path):
    """With out= set, the full [n_train, n_test] is a .npy memmap equal to the in-memory scores;
    a failed scoring leaves neither the file nor a temp."""
    params, loss, train, test = _problem()
    f = _features(params, loss)
    build_store(tmp_path / "s", f, train, params=params, config=CONFIG)
    out = tmp_path / "scores.npy"
    store = open_store(tmp_path / "s", block_rows=7, out=out)
    T = f(test)
    S = stream_scores(f, store, T)
    ref = stream_scores(f, train, T)
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.load(out), S.numpy())
    S[0, 0] = 123.0  # copy-on-write: the file keeps the scores
    assert np.load(out)[0, 0] != 123.0
    with pytest.raises(ValueError, match=r"stream_scores\(train=...\): expected a store of features as wide"):
        stream_scores(f, open_store(tmp_path / "s", out=tmp_path / "bad.npy"), T[:, :3])
    assert not (tmp_path / "bad.npy").exists() and _temps(tmp_path) == []


def test_tracin_stacked_features_through_store(tmp_path):
    """TracIn's [C, b, F] features round-trip through a store: scores equal sum_c lr_c G_c G_c^T."""
    params, loss, train, test = _problem()
    ckpts = [params, {k: v * 0.9 for k, v in params.items()}]
    m = tracin(loss, lrs=[0.5, 0.25])
    rec = record_store(tmp_path, train, params=ckpts, config={"method": "tracin"})
    S = m.score(ckpts, (), rec, test)
    assert open_store(tmp_path).manifest["layout"] == "stacked"
    torch.testing.assert_close(S, m.score(ckpts, (), train, test), rtol=0, atol=1e-12)
    S2 = m.score(ckpts, (), open_store(tmp_path, params=ckpts), test)
    torch.testing.assert_close(S2, S, rtol=0, atol=0)


def test_stream_self_and_hash_errors(tmp_path):
    """stream_self refuses a store without recorded self-scores by name; params_hash changes
    with any weight and key order."""
    params, loss, train, _ = _problem()
    f = _features(params, loss)
    store = build_store(tmp_path, f, train, params=params)
    assert isinstance(store, FeatureStore)
    with pytest.raises(ValueError, match=r"stream_self\(train=...\): expected a store with its "
                                         r"self-scores recorded .* got none"):
        stream_self(f, f, store)
    swapped = dict(reversed(list(params.items())))
    assert params_hash(params) != params_hash(swapped)
    assert params_hash(params) == params_hash({k: v.clone() for k, v in params.items()})
    with pytest.raises(TypeError, match=r"build_store\(config=...\): expected JSON-serialisable"):
        build_store(tmp_path / "x", f, train, params=params, config={"bad": object()})


def test_stats_store_caches_kfac_factors(tmp_path):
    """stats_store computes K-FAC factors once; a second call loads them equal bit for bit without
    computing; other params or config are refused by name; a killed save's temp is removed."""
    from torch import nn

    from dattri_fn.operators.kfac import KFACFactors
    from dattri_fn.solve import kfac_factors
    from dattri_fn.store import stats_store

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = (torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (10,), generator=g))
    ce = torch.nn.functional.cross_entropy
    cfg = {"kind": "kfac", "layers": ["0", "2"]}
    f1 = stats_store(tmp_path, lambda: kfac_factors(model, ce, params, data), params=params, config=cfg)
    (tmp_path / ".stats.pt.ab12cd_9.tmp").write_bytes(b"partial")

    def never():
        raise AssertionError("recomputed")

    f2 = stats_store(tmp_path, never, params=params, config=cfg)
    assert isinstance(f2, KFACFactors) and _temps(tmp_path) == []
    for k in f1.A:
        assert torch.equal(f1.A[k], f2.A[k]) and torch.equal(f1.G[k], f2.G[k])
    with pytest.raises(ValueError, match=r"stats_store\(params=...\): expected the store's params_hash"):
        stats_store(tmp_path, never, params={k: v * 2 for k, v in params.items()}, config=cfg)
    with pytest.raises(ValueError, match=r"stats_store\(config=...\): expected the store's "
                                         r"config\['kind'\] = 'kfac'"):
        stats_store(tmp_path, never, params=params, config=dict(cfg, kind="ekfac"))


def test_functional_model_grad_dot_through_store(tmp_path):
    """grad_dot(FunctionalModel) (factored LayerGrads rows) through a store (stored dense) equals
    the factored scores from the data and G_train G_test^T, to 1e-12."""
    from torch import nn

    from dattri_fn.model import functional_model

    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fm = functional_model(model, torch.nn.functional.cross_entropy)
    x, y = torch.randn(14, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (14,), generator=g)
    train, test = _split((x[:10], y[:10]), 4), (x[10:], y[10:])
    m = grad_dot(fm)
    S = m.score(fm.params, (), record_store(tmp_path, train, params=fm.params), test)
    torch.testing.assert_close(S, m.score(fm.params, (), train, test), rtol=0, atol=1e-12)
    G = per_sample_grad(fm.loss, fm.params, (x, y))
    torch.testing.assert_close(S, G[:10] @ G[10:].T, rtol=0, atol=1e-12)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="flock (POSIX)")
def test_second_live_writer_refused(tmp_path):
    """While a live writer holds a store's writer.lock, another build_store is refused by name;
    once it is released (as when its process dies) the build proceeds."""
    import fcntl

    params, loss, train, _ = _problem()
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / "writer.lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match=r"build_store\(path=...\): expected a store no other live "
                                             r"process is writing"):
            build_store(tmp_path, _features(params, loss), train, params=params)
    assert build_store(tmp_path, _features(params, loss), train, params=params).n_rows == 20


@pytest.mark.parametrize("batch_rows", [None, 8])
@pytest.mark.filterwarnings("error")
def test_influence_scores_from_store(tmp_path, batch_rows):
    """IF (explicit, damped Hessian) scored from a store of its train gradients equals IF from the
    data, g_i^T (H + I)^-1 g_j, to 1e-12; batch_rows (merged batches) leaves a store as is."""
    from dattri_fn.attribute import influence

    params, loss, train, test = _problem()
    m = influence(loss, solver="explicit", damping=1.0, batch_rows=batch_rows)
    state = m.prepare(params, train)
    ref = m.score(params, state, train, test)
    S = m.score(params, state, record_store(tmp_path, train, params=params, config={"m": "if"}), test)
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)
    S2 = m.score(params, state, open_store(tmp_path, params=params), test, top_k=2)
    assert torch.equal(S2.indices, ref.topk(2, dim=0).indices)


def _self_methods():
    """Methods whose self_score runs through stream_self: symmetric (Grad-Dot), checkpoint-weighted
    (TracIn) and preconditioned (influence: t = g, p = (H + damping I)^-1 g)."""
    from dattri_fn.attribute import influence

    return {
        "grad_dot": (lambda loss: grad_dot(loss), lambda p: p),
        "tracin": (lambda loss: tracin(loss, lrs=[0.5, 0.25]),
                   lambda p: [p, {k: v * 0.9 for k, v in p.items()}]),
        "influence": (lambda loss: influence(loss, solver="explicit", damping=1.0), lambda p: p),
    }


@pytest.mark.parametrize("name", sorted(_self_methods()))
def test_self_score_from_a_store_equals_self_score_from_data(tmp_path, name):
    """s_i = <t(z_i), p(z_i)>: self_score(record_store) writes it to <store>/self and equals
    self_score(train) bit for bit; then self_score(open_store) reads it with no training data."""
    params, loss, train, test = _problem()
    build, params_of = _self_methods()[name]
    m, params = build(loss), params_of(params)
    state = m.prepare(params, train)
    want = m.self_score(params, state, train)
    rec = record_store(tmp_path, train, params=params, config={"method": name})
    torch.testing.assert_close(m.self_score(params, state, rec), want, rtol=0, atol=0)
    m.score(params, state, rec, test)  # writes the train features themselves
    store = open_store(tmp_path, params=params, config={"method": name})
    torch.testing.assert_close(m.self_score(params, state, store), want, rtol=0, atol=0)
    torch.testing.assert_close(m.score(params, state, store, train).diagonal(), want,
                               rtol=1e-10, atol=1e-12)
    assert json.loads((tmp_path / "self" / "manifest.json").read_text())["kind"] == "self"


def test_self_scores_refused_when_recorded_for_other_data(tmp_path):
    """Self-scores recorded for other rows (or the self/ part opened as a feature store) are
    refused by name, never returned for the wrong training set."""
    params, loss, train, test = _problem()
    m = grad_dot(loss)
    rec = record_store(tmp_path, train, params=params, config=CONFIG)
    m.score(params, (), rec, test)
    other = [(x + 1, y) for x, y in train]
    m.self_score(params, (), record_store(tmp_path / "other", other, params=params, config=CONFIG))
    (tmp_path / "self").mkdir()
    for name in os.listdir(tmp_path / "other" / "self"):
        if not name.endswith(".lock"):
            (tmp_path / "self" / name).write_bytes((tmp_path / "other" / "self" / name).read_bytes())
    with pytest.raises(ValueError, match=r"grad_dot\(train=...\): expected self-scores recorded "
                                         r"for this store \(the same data_hash\)"):
        m.self_score(params, (), open_store(tmp_path))
    with pytest.raises(ValueError, match=r"grad_dot\(train=...\): expected a store of train "
                                         r"features, got the store of self-scores"):
        m.score(params, (), open_store(tmp_path / "other" / "self"), test)


def test_params_hash_of_a_scalar_parameter():
    """A 0-d parameter (a scalar bias) hashes (it had no byte view: a raw RuntimeError) and
    its value enters the hash."""
    p = {"w": torch.ones(3, dtype=torch.float64), "b": torch.tensor(0.5, dtype=torch.float64)}
    assert params_hash(p) != params_hash({**p, "b": torch.tensor(0.25, dtype=torch.float64)})
    assert params_hash(p) == params_hash({k: v.clone() for k, v in p.items()})


def test_record_self_resumes_and_binds_the_state(tmp_path):
    """record_self of s_i = |g_i|^2 that raises in shard 2 resumes there (shards 0-1 not recomputed,
    a killed save's temp removed) and equals an uninterrupted record byte for byte; read back
    with self_scores under the same state, refused under another, naming state."""
    from dattri_fn.store import record_self, self_scores, state_hash

    params, loss, train, _ = _problem()
    f = _features(params, loss)
    diag = lambda b: (f(b) ** 2).sum(1)
    state = (torch.ones(2, dtype=torch.float64), {"k": torch.zeros(3)})
    ref = record_self("m", record_store(tmp_path / "ref", train, params=params), diag, state=state)
    calls = []
    failing = _fails_third(diag, calls)

    rec = record_store(tmp_path / "s", train, params=params)
    with pytest.raises(RuntimeError, match="boom"):
        record_self("m", rec, failing, state=state)
    (tmp_path / "s" / "self" / ".shard-000002.npy.ab12cd_9.tmp").write_bytes(b"partial")
    calls.clear()
    got = record_self("m", rec, lambda b: (calls.append(1), diag(b))[1], state=state)
    assert len(calls) == len(train) - 2 and _temps(tmp_path / "s") == []
    _same_store(tmp_path / "s" / "self", tmp_path / "ref" / "self")
    assert torch.equal(got, ref) and torch.equal(ref, stream_self(f, f, train))
    build_store(tmp_path / "s", f, train, params=params)
    store = open_store(tmp_path / "s")
    assert torch.equal(self_scores("m", store, state=state), ref)
    moved = (torch.ones(2, dtype=torch.float64) * 2, state[1])
    assert state_hash(moved) != state_hash(state) == state_hash((state[0].clone(), state[1]))
    with pytest.raises(ValueError, match=r"m\(state=...\): expected the state the store at "
                                         r".* was written under \(state_hash [0-9a-f]{12}\), got "
                                         r"state_hash [0-9a-f]{12}"):
        self_scores("m", store, state=moved)
    with pytest.raises(ValueError, match=r"m\(state=...\)"):
        record_self("m", rec, diag, state=moved)
    with pytest.raises(TypeError, match=r"state_hash\(state=...\): expected a state of tensors"):
        state_hash((torch.ones(1), object()))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer forks its kill targets")
def test_record_append_mode_sigkill_resumes_bit_identical(tmp_path):
    """48 recorded SGD steps in append mode (4 steps a grouped shard), the loop SIGKILLed at 5
    seeded random moments and run again each time, leave every group equal to an uninterrupted
    run's byte for byte (shard and manifest), with no temp file left."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(WRITER), str(tmp_path), "23", "5", "record"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["signals"] == [0] + [signal.SIGKILL] * 5 + [0], report
    assert report["committed"] == sorted(report["committed"])  # no committed group is lost
    assert report["committed"][-1] < 12  # the last run really had work left
    assert _temps(tmp_path / "killed") == []
    groups = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len(groups) == 12 and sorted(p.name for p in (tmp_path / "killed").iterdir()) == groups
    for g in groups:
        _same_store(tmp_path / "killed" / g, tmp_path / "ref" / g)


def test_write_grouped_members_read_alone(tmp_path):
    """write_grouped: each member read through open_store(<group>/<member>) is its own rows
    exactly (blocks of 2 rows too), the group reads as their concatenation, a member's params
    are checked by open_store(params=...), and mixed dtypes or no parts are refused."""
    from dattri_fn.store import grouped_parts, write_grouped

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 4, generator=g, dtype=torch.float64).numpy() for n in (3, 1, 5)]
    p = [{"w": torch.full((2,), float(i), dtype=torch.float64)} for i in range(3)]
    parts = [(f"m{i}", r, f"{i}" * 64, params_hash(p[i])) for i, r in enumerate(rows)]
    write_grouped(tmp_path, parts, config={"kind": "test"})
    assert sorted(grouped_parts(tmp_path)) == ["m0", "m1", "m2"]
    for i, r in enumerate(rows):
        member = open_store(tmp_path / f"m{i}", params=p[i], block_rows=2)
        assert member.n_rows == len(r) and member.manifest["config"]["part"] == f"m{i}"
        np.testing.assert_array_equal(member.read().numpy(), r)
    np.testing.assert_array_equal(open_store(tmp_path).read().numpy(), np.concatenate(rows))
    with pytest.raises(ValueError, match=r"open_store\(params=...\): expected the store's params_hash"):
        open_store(tmp_path / "m1", params=p[0])
    with pytest.raises(FileNotFoundError, match=r"open_store\(path=...\)"):
        open_store(tmp_path / "m9")
    with pytest.raises(ValueError, match=r"write_grouped\(parts=...\): expected rows of one dtype"):
        write_grouped(tmp_path / "x", [("a", rows[0], "", ""), ("b", rows[1].astype(np.float32), "", "")])
    with pytest.raises(ValueError, match=r"write_grouped\(parts=...\): expected at least one part"):
        write_grouped(tmp_path / "y", [])


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_influence_self_scores_in_a_store_are_bound_to_the_inverse(tmp_path, solver):
    """s_i = g_i^T (H + d I)^-1 g_i depends on d: a record made at d = 1 is never served for
    d = 100 (refused naming state); each damping's record equals its self_score from the data."""
    from dattri_fn.attribute import influence

    params, loss, (x, y) = PROBLEMS["mlp"](n=12, seed=0)
    train = [(x[:6], y[:6]), (x[6:], y[6:])]
    a = influence(loss, solver=solver, damping=1.0)
    b = influence(loss, solver=solver, damping=100.0)
    sa, sb = a.prepare(params, train), b.prepare(params, train)
    rec = lambda path: record_store(path, train, params=params, config={"m": "if"})
    got = a.self_score(params, sa, rec(tmp_path / "s"))
    assert torch.equal(got, a.self_score(params, sa, train))
    with pytest.raises(ValueError, match=r"if_\w+\(state=\.\.\.\): expected the state"):
        b.self_score(params, sb, rec(tmp_path / "s"))
    with pytest.raises(ValueError, match=r"if_\w+\(state=\.\.\.\): expected the state"):
        b.self_score(params, sb, open_store(tmp_path / "s" / "self"))
    assert torch.equal(b.self_score(params, sb, rec(tmp_path / "t")), b.self_score(params, sb, train))
    assert torch.equal(a.self_score(params, sa, open_store(tmp_path / "s" / "self")), got)
