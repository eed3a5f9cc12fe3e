"""benchmarks.scaling beyond its five default methods: every dattri counterpart, size flags, the
CPU-time skip rule, the dense-matrix and resident-size caps, and our side's configuration."""

import pytest
import torch

from benchmarks import scaling
from benchmarks.against_dattri import COUNTERPARTS

RECIPE_NAMES = ("grad-cos", "tracin-cos", "if-explicit", "if-lissa", "if-datainf", "if-ekfac",
                "rps", "knn-shapley")


@pytest.fixture(scope="module")
def toy():
    """80 resampled digits rows, 3 seeded 64-8-10 MLPs (P = 610)."""
    return scaling.synthetic_digits(80), [scaling.mlp(8, c) for c in range(scaling.N_MODELS)]


def _scores(r):
    return r.method.score(r.params, r.method.prepare(r.params, r.train), r.train, r.test).detach()


def test_every_dattri_counterpart_can_be_named():
    """COUNTERPARTS is a subset of ALL_METHODS; the default run keeps the five original methods."""
    assert set(COUNTERPARTS) <= set(scaling.ALL_METHODS)
    assert scaling.METHODS == ("grad-dot", "tracin", "trak", "if-cg", "if-arnoldi")
    assert len(set(scaling.ALL_METHODS)) == len(scaling.ALL_METHODS)


def test_size_flags_parse_and_refuse():
    """--sizes/--widths are comma-separated positive integers ('' = that sweep off)."""
    assert scaling._ints("1000,4000", "--sizes") == (1000, 4000)
    assert scaling._ints("", "--widths") == ()
    for bad in ("0", "12,x", "-3"):
        with pytest.raises(SystemExit, match="--sizes: expected comma-separated positive"):
            scaling._ints(bad, "--sizes")
    with pytest.raises(SystemExit, match="--methods: unknown"):
        scaling.main(["--methods", "grad-cos,nope", "--quiet", "--json", ""])


def test_dense_over_cap():
    """IF-explicit is skipped exactly when 4 P^2 bytes exceed the cap; other methods never."""
    cap = 4.0
    edge = int((cap * 2**30 / 4) ** 0.5)  # 4 edge^2 = cap exactly
    assert not scaling.dense_over_cap("if-explicit", edge, cap)
    assert scaling.dense_over_cap("if-explicit", edge + 1, cap)
    assert not scaling.dense_over_cap("if-cg", 10**6, cap)
    assert not scaling.dense_over_cap("if-explicit", 10**6, 0.0)  # no cap


def test_sweep_skips_on_cpu_time_and_maps_the_cap(monkeypatch):
    """The skip rule reads CPU time (cpu x growth > budget), not the wall time a loaded machine
    stretches; a child that exits with MEM_CAP_EXIT is status memcap, and later sizes skip."""
    calls = []

    def fake(fn, name, n, w, cg_iters, side, cap, *, timeout, start):
        calls.append(n)
        if n == 10:  # wall 30 s, CPU 2 s: 2 x 4 = 8 < 10 = budget
            return {"result": (10.0, 20.0, 2.0), "peak_mib": 1.0}
        if n == 40:  # CPU 3 s: 3 x 4 = 12 > 10
            return {"result": (1.0, 1.0, 3.0), "peak_mib": 1.0}
        return {"error": f"the child exited with code {scaling.MEM_CAP_EXIT}"}

    monkeypatch.setattr(scaling, "measure", fake)
    kw = dict(n_fixed=10, width_fixed=8, budget=10.0, cg_iters=2, log=lambda *a: None)
    pts = scaling.sweep("grad-cos", "n", [10, 40, 160], **kw)
    assert calls == [10, 40] and [p.status for p in pts] == ["ok", "ok", "skipped"]
    assert pts[0].cpu_s == 2.0 and "predicted 12 s" in pts[2].detail
    calls.clear()
    pts = scaling.sweep("grad-cos", "n", [10, 40, 160], **{**kw, "budget": 5.0})
    assert calls == [10] and [p.status for p in pts] == ["ok", "skipped", "skipped"]
    assert "predicted 8 s" in pts[1].detail and "previous size skipped" in pts[2].detail
    calls.clear()
    pts = scaling.sweep("grad-cos", "n", [5, 20], **kw)
    assert calls == [5] and [p.status for p in pts] == ["memcap", "skipped"]
    assert "previous size memcap" in pts[1].detail


def test_ratio_table_uses_cpu_time():
    """time ratio = CPU_ours / CPU_dattri and mem ratio = MiB_ours / MiB_dattri per point."""
    base = dict(method="m", sweep="n", n_train=1, width=1, params=85, status="ok")
    ours = scaling.Point(**base, prepare_s=5.0, score_s=5.0, peak_mib=1.0, cpu_s=1.0)
    theirs = scaling.Point(**base, prepare_s=1.0, score_s=1.0, peak_mib=4.0, cpu_s=8.0,
                           side="dattri")
    row = scaling.ratio_table([ours, theirs]).splitlines()[-1]
    assert "| 1.000 | 8.000 | 0.125 | 1.0 | 4.0 | 0.250 |" in row


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_our_side_is_the_recipe(toy, name):
    """For a method with a recipe, our side's scores are recipe(name, batch_size=batch_rows(P))'s
    bit for bit (no setting but the batch size)."""
    from dattri_fn.app.recipes import recipe

    task, models = toy
    mine = scaling.our_recipe(name, task, models, cg_iters=3)
    ref = recipe(name, task, models, batch_size=scaling.batch_rows(610))
    assert torch.equal(_scores(mine), _scores(ref))


def test_our_cg_ensemble_is_the_mean_of_single_cg(toy):
    """if-cg-ens = (1/C) sum_c if-cg(model_c), each exactly cg_iters CG steps (rtol = 0)."""
    import copy
    import dataclasses

    task, models = toy
    task = dataclasses.replace(task, x_train=task.x_train.double(), x_test=task.x_test.double())
    models = [copy.deepcopy(m).double() for m in models]
    ens = _scores(scaling.our_recipe("if-cg-ens", task, models, cg_iters=3))
    single = [_scores(scaling.our_recipe("if-cg", task, [m], cg_iters=3)) for m in models]
    mean = torch.stack(single).mean(0)
    assert ens.dtype == torch.float64
    assert float((ens - mean).abs().max()) <= 1e-10 * float(mean.abs().max())


@pytest.mark.parametrize("name", ("logra", "factgrass"))
def test_our_block_methods_match_the_runner(toy, name):
    """LoGra/FactGraSS are built as benchmarks.run builds them: equal scores."""
    from benchmarks import run

    task, models = toy
    hp = {"batch_size": scaling.batch_rows(610)}
    r = run.ours_runner(name, task, models, hp)
    with torch.no_grad():
        ref = r.score(r.prepare())
    assert torch.equal(_scores(scaling.our_recipe(name, task, models, cg_iters=3)), ref)


def test_every_new_method_runs_a_point_on_our_side():
    """A toy point of each added method returns prepare and score times >= 0 (score > 0)."""
    for name in scaling.MORE_METHODS:
        prep, score = scaling.point_setup(name, 80, 8, 3)()
        assert prep >= 0 and score > 0, name


@pytest.mark.slow  # one spawned process: ~5 s of imports
def test_memory_cap_stops_a_point():
    """A spawned point over its resident-size cap (1 MiB: any process) is status memcap."""
    pts = scaling.sweep("grad-cos", "n", [80], n_fixed=80, width_fixed=8, budget=30.0,
                        cg_iters=2, log=lambda *a: None, mem_cap_gib=2**-10)
    assert [p.status for p in pts] == ["memcap"] and "over 0.000976562 GiB" in pts[0].detail


def test_scaling_profile_builds_and_times_a_point():
    """scaling_profile's build is our_recipe warmed up; timed gives CPU s >= 0 per phase."""
    from benchmarks import scaling_profile

    r = scaling_profile.build("grad-cos", 80, 8, 3)
    prep, score = scaling_profile.timed(r, 2)
    assert r.name == "grad-cos" and prep >= 0 and score > 0
    # the listing's first 3 rows can all be score's wrappers on a slow run: 50 rows hold prepare
    assert "prepare" in scaling_profile.profile_text(r, 50, 3)
