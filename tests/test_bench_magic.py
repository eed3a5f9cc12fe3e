"""benchmarks.magic on toy sizes: rows scored against the three ground truths, the scan step."""

import pytest
import torch

from benchmarks import magic as bench
from benchmarks import run


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The benchmark's setting (OMP_NUM_THREADS=1, as train_model trains): float32 reductions then
    run in one order, so a replay can equal the trained models bit for bit. Spawned methods read
    the variable; this process sets its own thread count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_magic_benchmark_smoke(tmp_path, capsys):
    """A tiny run prints an LDS in [-1, 1] under each protocol for magic, magic-ens and magic@gt
    (two spawned methods, no scan)."""
    out = bench.main(["--n-train", "70", "--n-test", "4", "--subsets", "5", "--r", "2",
                      "--models", "2", "--methods", "", "--scan", "",
                      "--cache-dir", str(tmp_path), "--quiet"])
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"magic", "magic-ens", "magic@gt"}
    for row in rows.values():
        for label in ("std r=1", "std r=2", "fixed"):
            assert -1.0 <= row[label][0] <= 1.0, (row["method"], label)
    assert "| magic-ens |" in capsys.readouterr().out
    assert rows["magic"]["replays_models"] and rows["magic-ens"]["replays_models"]


@pytest.mark.slow
def test_magic_rows_replay_the_text_lm_models_of_the_tasks_adam_trainer():
    """magic_setup on text-lm --optimizer adam (in process): both runs' final params equal
    train_model's models bit for bit (replays_models) and the scores are [n_train, n_test]."""
    args = bench.parse_args(["--task", "text-lm", "--optimizer", "adam", "--n-train", "12",
                             "--n-test", "2"])
    spec = run.task_spec(bench._runner_args(args))
    assert spec["hparams"] is None  # the task's own Adam trainer, not SGD_HPARAMS
    spec["hparams"] = {"epochs": 3}
    states = run.train_states(run.load_task(spec), 2)
    res = bench.magic_setup({"task": spec, "seeds": [0, 1], "states": states})()
    assert res["replays_models"] is True and res["T"] == 3
    assert res["scores"].shape == (12, 2)


def test_scan_step_counts_steps_and_checkpoints():
    """scan_setup's step (in process): T = epochs * ceil(n / 64) steps, ceil(T / c) + 1 states."""
    args = bench._runner_args(bench.parse_args(["--n-train", "70", "--n-test", "3"]))
    step = bench.scan_setup({"task": run.task_spec(args), "epochs": 2, "every": 3})
    res = step()
    assert res["T"] == 4 and res["checkpoints"] == 3 and res["score_s"] > 0


def test_adam_option_is_refused_on_a_task_not_trained_by_adam():
    """--optimizer adam on digits-lr (L-BFGS) exits with a usage error."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--task", "digits-lr", "--optimizer", "adam"])


def test_horizon_metagradient_at_k_equal_t_is_magic_and_grows_by_steps():
    """benchmarks.magic_horizon: the last-K-steps metagradient at K = T == metagradient (1e-12,
    float64); K = 1 == the last step's vjp alone: d(theta_T)/dw_i only for the rows of step T-1."""
    from torch.func import grad, vmap

    from benchmarks.magic_horizon import horizon_metagradients
    from dattri_fn.attribute.magic import metagradient
    from dattri_fn.training import batch_order, make_step, sgd, train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (9,), generator=g)
    params = {"W": 0.5 * torch.randn(2, 3, generator=g, dtype=torch.float64)}
    loss = lambda p, ex: torch.nn.functional.cross_entropy((p["W"] @ ex[0])[None], ex[1][None])
    opt = sgd(0.3, momentum=0.9)
    step = make_step(loss, opt)
    order = batch_order(9, batch_size=4, epochs=3, seed=1)
    traj = train(step, params, opt.init(params), (x, y), order, checkpoint_every=4)
    cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(traj.params, (x[:2], y[:2]))
    curves, norms = horizon_metagradients(step, traj, (x, y), order, cot, every_steps=3)
    assert sorted(curves) == sorted(norms) == [3, 6, 9] and min(norms.values()) > 0
    full = metagradient(step, traj, (x, y), order, cot).weights
    torch.testing.assert_close(curves[9], full, rtol=0, atol=1e-12)
    one = horizon_metagradients(step, traj, (x, y), order, cot, every_steps=1)[0][1]
    outside = torch.ones(9, dtype=torch.bool)
    outside[order[-1]] = False
    assert torch.all(one[:, outside] == 0) and one[:, ~outside].abs().max() > 0


@pytest.mark.slow
def test_magic_horizon_benchmark_prints_an_auto_row(tmp_path, capsys):
    """benchmarks.magic_horizon on a toy digits-lr: an "auto" row whose K_j lie in (0, 40]
    epochs, LDS in [-1, 1] under every protocol, and the summary table names auto and 3T/4."""
    from benchmarks import magic_horizon

    rows = magic_horizon.main(["--task", "digits-lr", "--n-train", "40", "--n-test", "3",
                               "--subsets", "4", "--r", "2", "--cache-dir", str(tmp_path)])
    auto = [r for r in rows if r["K"] == "auto"]
    assert len(auto) == 1 and all(0 < k <= 40 for k in auto[0]["K_epochs"])
    for label in ("std r=1", "std r=2", "fixed"):
        assert -1.0 <= auto[0][label] <= 1.0
    out = capsys.readouterr().out
    assert "| 1 | auto |" in out and "| 1 | K = 3T/4 |" in out


@pytest.mark.slow
def test_horizon_rows_reach_magic_and_bad_options_are_refused():
    """--horizons auto,1 parses to ['auto', 1]; magic_setup(horizon=...) (in process, digits-mlp
    SGD, 2 epochs, T = 4): horizon >= T == the exact row bit for bit, horizon=1 differs, auto is
    finite [n_train, n_test]; --magic-rows bogus, --horizons x, --ens-horizons x exit with a usage
    error and --ens-horizons 'auto, 3' parses to ['auto', 3]."""
    args = bench.parse_args(["--n-train", "70", "--n-test", "3", "--horizons", "auto,1",
                             "--magic-rows", "magic"])
    assert args.horizons == ["auto", 1] and args.magic_rows == ["magic"]
    spec = run.task_spec(bench._runner_args(args))
    out = {h: bench.magic_setup({"task": spec, "seeds": [0], "epochs": 2, "horizon": h})()
           for h in (None, 9, 1, "auto")}
    assert out[None]["T"] == 4
    assert (out[9]["scores"] == out[None]["scores"]).all()
    assert not (out[1]["scores"] == out[None]["scores"]).all()
    auto = torch.from_numpy(out["auto"]["scores"])
    assert auto.shape == (70, 3) and torch.isfinite(auto).all()
    for bad in (["--magic-rows", "bogus"], ["--horizons", "x"], ["--ens-horizons", "x"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.parse_args(["--ens-horizons", "auto, 3"]).ens_horizons == ["auto", 3]
