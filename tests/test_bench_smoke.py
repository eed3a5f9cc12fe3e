"""Benchmark runner, dattri side-by-side and scaling probe: logic on toy sizes, one spawned smoke run."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import run, scaling
from dattri_fn.app.recipes import METHODS
from dattri_fn.eval.retrain import lds_ground_truth
from dattri_fn.eval.tasks import get_task

TINY = ["--task", "digits-lr", "--n-train", "60", "--n-test", "5", "--subsets", "4",
        "--models", "1", "--repeats", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_task():
    return get_task("digits-lr", n_train=60, n_test=5)


def _spec(method: str, side: str = "ours") -> dict:
    args = run.parse_args(TINY + ["--methods", method])
    task = run.load_task(run.task_spec(args))
    return {"task": run.task_spec(args), "states": run.train_states(task, 1), "method": method,
            "side": side, "hp": run.hyper_parameters(args), "repeats": 1}


@settings(max_examples=20)
@given(n=st.integers(3, 40), k=st.integers(1, 4), scale=st.floats(0.1, 10.0),
       shift=st.floats(-5, 5), seed=st.integers(0, 2**20))
def test_pearson_all_affine(n, k, scale, shift, seed):
    """pearson_all(a, s a + c) = 1 and pearson_all(a, -a) = -1 for s > 0."""
    a = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert math.isclose(run.pearson_all(a, scale * a + shift), 1.0, abs_tol=1e-10)
    assert math.isclose(run.pearson_all(a, -a), -1.0, abs_tol=1e-10)
    bad = a.clone()
    bad[0, 0] = float("nan")
    assert math.isnan(run.pearson_all(a, bad))


def test_parse_args_defaults_and_errors():
    """Digits defaults are n_train 500, n_test 50, m 64; unknown methods and tasks are refused;
    --against dattri is accepted on every task."""
    args = run.parse_args(["--task", "digits-lr"])
    assert (args.n_train, args.n_test, args.subsets) == (500, 50, 64)
    # magic: by name; LoGra and FactGraSS are built by the runner itself
    assert args.methods == [m for m in METHODS if not m.startswith("magic")] + ["logra", "factgrass"]
    with pytest.raises(SystemExit):
        run.parse_args(["--methods", "if-cg,nope"])
    with pytest.raises(SystemExit):
        run.parse_args(["--task", "nope"])
    assert run.parse_args(["--task", "text-lm", "--against", "dattri"]).n_train == 128


def test_bench_step_in_process_and_quality(tiny_task, tmp_path):
    """The step returns [n_train, n_test] finite scores and times; LDS lies in [-1, 1]."""
    step = run.bench_setup(_spec("grad-dot"))
    out = step()
    assert out["scores"].shape == (60, 5)
    assert out["prepare_s"] >= 0 and out["score_s"] > 0
    gt = lds_ground_truth(tiny_task, 4, cache_dir=str(tmp_path), progress=False)
    q = run.quality(torch.from_numpy(out["scores"]), gt, None)
    assert -1 <= q["lds_lo"] <= q["lds"] <= q["lds_hi"] <= 1
    nan = torch.full((60, 5), float("nan"), dtype=torch.float64)
    assert "NaN" in run.quality(nan, gt, None)["quality_error"]


def test_tables_and_jsonl(tmp_path):
    """A failed row shows its error; pair ratios are ours / dattri; JSON lines drop tensors."""
    ok = {"method": "grad-dot", "side": "ours", "lds": 0.5, "lds_lo": 0.4, "lds_hi": 0.6,
          "prepare_s": 0.0, "score_s": 2.0, "peak_mib": 10.0, "scores": torch.eye(3)}
    bad = {"method": "if-cg", "side": "ours", "error": "ValueError: boom | x"}
    text = run.method_table([ok, bad], loo=False)
    assert "| grad-dot | 0.500 | [0.400, 0.600] |" in text
    assert "ValueError: boom / x" in text
    theirs = {**ok, "side": "dattri", "score_s": 4.0, "peak_mib": 40.0, "lds": 0.3}
    pair = run.pair_record("grad-dot", ok, theirs, None)
    assert pair["time_ratio"] == 0.5 and pair["peak_ratio"] == 0.25
    assert math.isclose(pair["lds_diff"], 0.2) and math.isclose(pair["corr"], 1.0)
    assert "| grad-dot | 2.000 | 4.000 | 0.500 |" in run.against_table([pair])
    path = tmp_path / "out.jsonl"
    run.append_jsonl(str(path), [ok, bad])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2 and "scores" not in lines[0] and lines[1]["error"].startswith("Value")


@pytest.mark.slow
def test_runner_smoke(tmp_path, capsys):
    """Two methods in spawned processes: table rows with finite LDS, times, memory; one JSON line each."""
    path = tmp_path / "r.jsonl"
    out = run.main(TINY + ["--methods", "grad-dot,if-cg", "--json", str(path),
                           "--cache-dir", str(tmp_path / "cache")])
    text = capsys.readouterr().out
    for name in ("grad-dot", "if-cg"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        lds, prep, score, peak = float(cells[1]), float(cells[3]), float(cells[4]), float(cells[5])
        assert -1 <= lds <= 1 and prep >= 0 and score > 0 and math.isfinite(peak)
        assert cells[-1] == ""
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["method"] for r in recs] == ["grad-dot", "if-cg"]
    assert all(math.isfinite(r["lds"]) and r["machine"]["torch"] for r in recs)
    assert len(out["rows"]) == 2


def test_dattri_counterparts_agree_where_defined_alike(tiny_task):
    """dattri's Grad-Dot and explicit IF equal ours (Pearson > 0.9999) after the identity mapping."""
    from benchmarks.against_dattri import DATTRI_INSTALL, dattri_available, dattri_runner, matched_runner

    if not dattri_available():
        pytest.skip(f"the optional comparison needs dattri: {DATTRI_INSTALL}")

    models = run.load_models(tiny_task, run.train_states(tiny_task, 1))
    hp = run.hyper_parameters(run.parse_args(TINY))
    pairs = (("grad-dot", run.ours_runner), ("if-explicit", matched_runner))
    for name, ours in pairs:
        mine = ours(name, tiny_task, models, hp)
        theirs = dattri_runner(name, tiny_task, models, hp)
        a, b = mine.score(mine.prepare()), theirs.score(theirs.prepare())
        assert a.shape == b.shape == (60, 5)
        assert run.pearson_all(a.detach(), b.detach()) > 0.9999


def test_runner_builds_logra_and_factgrass(tiny_task):
    """The runner's own methods give finite [n_train, n_test] scores on a bare nn.Linear task."""
    models = run.load_models(tiny_task, run.train_states(tiny_task, 1))
    hp = run.hyper_parameters(run.parse_args(TINY))
    for name in run.EXTRA_METHODS:
        r = run.ours_runner(name, tiny_task, models, hp)
        S = r.score(r.prepare())
        assert S.shape == (60, 5) and bool(torch.isfinite(S).all())


def test_dattri_issue18_counterparts_agree(tiny_task):
    """dattri's TracIn-Cos and KNN-Shapley (transposed) equal ours: Pearson > 0.9999."""
    from benchmarks.against_dattri import DATTRI_INSTALL, dattri_available, dattri_runner

    if not dattri_available():
        pytest.skip(f"the optional comparison needs dattri: {DATTRI_INSTALL}")
    models = run.load_models(tiny_task, run.train_states(tiny_task, 2))
    hp = run.hyper_parameters(run.parse_args(TINY))
    for name in ("tracin-cos", "knn-shapley"):
        mine, theirs = run.ours_runner(name, tiny_task, models, hp), dattri_runner(
            name, tiny_task, models, hp)
        a, b = mine.score(mine.prepare()), theirs.score(theirs.prepare())
        assert a.shape == b.shape == (60, 5)
        assert run.pearson_all(a.detach(), b.detach()) > 0.9999


@settings(max_examples=15)
@given(width=st.integers(1, 300))
def test_scaling_num_params(width):
    """num_params(w) = 75 w + 10 = the parameter count of the 64-w-10 MLP; batch rows in [8, 256]."""
    model = scaling.mlp(width, 0)
    P = sum(p.numel() for p in model.parameters())
    assert scaling.num_params(width) == P == 75 * width + 10
    assert 8 <= scaling.batch_rows(P) <= 256


def test_scaling_plan_and_skip_rule():
    """Growth is size_k / size_(k-1); a size is skipped when last time x growth > budget."""
    assert scaling.plan([10, 40, 160]) == [(10, 0.0), (40, 4.0), (160, 4.0)]
    done = scaling.Point("m", "n", 1, 1, 1, "ok", prepare_s=1.0, score_s=2.0)
    assert not scaling.predicted_over(None, 4.0, 10.0)
    assert not scaling.predicted_over(done, 3.0, 10.0)
    assert scaling.predicted_over(done, 4.0, 10.0)
    assert scaling.predicted_over(done._replace(status="timeout"), 1.0, 10.0)


def test_scaling_synthetic_digits_and_one_point():
    """Resampled rows are seeded (same seed, same rows) with labels in 0..9; a toy point runs."""
    a, b = scaling.synthetic_digits(300, seed=1), scaling.synthetic_digits(300, seed=1)
    assert a.x_train.shape == (300, 64) and torch.equal(a.x_train, b.x_train)
    assert int(a.y_train.min()) >= 0 and int(a.y_train.max()) <= 9
    prep, score = scaling.point_setup("if-cg", 80, 8, 3)()
    assert prep >= 0 and score > 0


def test_dattri_losses_follow_the_task():
    """The dattri-facing losses use the task's loss: class labels give TRAK's margin
    log(p / (1 - p)) and p_y; sequence targets (text-lm) give minus the loss and p = 0 (Q = 1),
    tokens cast to float come back as indices; a model without a final Linear has no RPS head."""
    from benchmarks.against_dattri import dattri_module, make_losses
    from dattri_fn.eval.tasks import TinyLM, classification_loss, lm_loss

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    params = dict(net.named_parameters())
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    cls = make_losses(net, (4,), (), 0.1, classification_loss)
    assert torch.allclose(cls.test(params, (x, y)), classification_loss(net(x), y))
    reg = 0.05 * sum((p * p).sum() for p in params.values())
    assert torch.allclose(cls.train(params, (x, y)), cls.test(params, (x, y)) + reg)
    p = torch.softmax(net(x[:1]), -1)[0, y[0]]
    assert torch.allclose(cls.prob(params, (x[0], y[0])), p)
    assert torch.allclose(cls.margin(params, (x[0], y[0])), torch.log(p / (1 - p)), atol=1e-6)
    assert dattri_module(net)[1] == "0"

    lm = TinyLM(vocab=7, context=6, dim=8, heads=2, hidden=8)
    tok, nxt = torch.randint(0, 7, (3, 6), generator=g), torch.randint(0, 7, (3, 6), generator=g)
    lm_params = dict(lm.named_parameters())
    seq = make_losses(lm, (6,), (6,), 0.0, lm_loss, tokens=True)
    assert torch.allclose(seq.test(lm_params, (tok, nxt)), lm_loss(lm(tok), nxt))
    # dattri's LiSSA collate casts tokens and targets to float: they are cast back
    assert torch.allclose(seq.test(lm_params, (tok.float(), nxt.float())), lm_loss(lm(tok), nxt))
    one = seq.test(lm_params, (tok[0], nxt[0]))
    assert torch.allclose(seq.margin(lm_params, (tok[0], nxt[0])), -one)
    assert float(seq.prob(lm_params, (tok[0], nxt[0])).detach()) == 0.0
    assert dattri_module(lm)[1] is None
