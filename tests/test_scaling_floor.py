"""benchmarks.scaling --floor: the floor point is one plain forward and backward per batch of our
side, and its table divides each side's CPU time by the floor's."""

from __future__ import annotations

import torch

from benchmarks import scaling


def test_floor_point_runs_forward_and_backward_over_our_batches(monkeypatch):
    """The floor step calls the model once per training batch of batch_rows(P) rows and once on
    the test batch, each followed by one backward (gradients w.r.t. every parameter)."""
    task = scaling.synthetic_digits(40)
    models = [scaling.mlp(4, 0)]
    seen, grads = [], []
    model = models[0]
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda out, ins, **k: grads.append(len(ins)) or
                        real(out, ins, **k))
    monkeypatch.setattr(scaling, "batch_rows", lambda P: 16)
    train_s, test_s = scaling.floor_point(task, models)()
    assert seen == [16, 16, 8, scaling.N_TEST] and grads == [4] * 4
    assert train_s > 0 and test_s > 0


def test_floor_table_divides_by_the_floor():
    """ours / floor = CPU_ours / CPU_floor and dattri / floor = CPU_dattri / CPU_floor per point."""
    base = dict(method="logra", sweep="P", n_train=1000, width=1333, params=99985, status="ok",
                prepare_s=1.0, score_s=1.0, peak_mib=1.0)
    pts = [scaling.Point(**base, cpu_s=0.066), scaling.Point(**base, cpu_s=0.067, side="dattri"),
           scaling.Point(**base, cpu_s=0.055, side="floor")]
    row = scaling.floor_table(pts).splitlines()[-1]
    assert "| 0.055 | 0.066 | 0.067 | 1.20 | 1.22 |" in row
    assert scaling.parse_args(["--floor"]).floor and not scaling.parse_args([]).floor
