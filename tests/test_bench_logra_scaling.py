"""benchmarks.logra_scaling's ``lds`` pieces on toy sizes: the widened task spec and one row's step."""

import numpy as np
import torch

from benchmarks import logra_scaling as ls
from benchmarks.run import load_models, load_task, train_states
from dattri_fn.eval.tasks import VOCAB
from dattri_fn.model import functional_model


def test_lds_spec_widens_to_the_parameter_count():
    """--params p gives dim = _dim_for(p), hidden = 4 dim and the given trainer settings."""
    spec = ls._lds_spec(16, 4, 2e5, 4, 3e-3, 20)
    D = ls._dim_for(2e5, len(VOCAB), 32)
    assert spec["hparams"] == {"dim": D, "heads": 4, "hidden": 4 * D, "lr": 3e-3, "epochs": 20}
    task = load_task(spec)
    P = sum(p.numel() for p in task.make_model(0).parameters())
    assert P <= 2e5 < sum(p.numel() for p in load_task(
        {**spec, "hparams": {**spec["hparams"], "dim": D + 4, "hidden": 4 * D + 16}}
    ).make_model(0).parameters())
    assert ls._lds_spec(16, 4, None, 4, 3e-3, 20)["hparams"] is None


def test_lds_row_step_scores_the_trained_model():
    """A row's step returns prepare + score of its method on the trained parameters, bit for bit,
    and its feature width (d, or 5 layers x k^2)."""
    threads = torch.get_num_threads()
    try:
        spec = ls._lds_spec(8, 3, None, 4, 3e-3, 20)
        task = load_task(spec)
        state = train_states(task, 1)[0]
        for name, dim in (("grad-dot", 16), ("logra", 2)):
            out = ls._lds_row_setup(spec, state, name, dim, 1)()
            fm = functional_model(load_models(task, [state])[0], task.loss_fn)
            method = ls._row_method(name, fm, dim, 1)
            train = [(task.x_train, task.y_train)]
            want = method.score(fm.params, method.prepare(fm.params, train), train,
                                (task.x_test, task.y_test)).double().numpy()
            assert out["scores"].shape == (8, 3)
            np.testing.assert_array_equal(out["scores"], want)
            # LoGra's features: k x k per captured Linear layer (qkv, proj, fc1, fc2, head).
            assert out["cpu_s"] > 0 and out["width"] == (dim if name == "grad-dot" else 5 * dim * dim)
    finally:
        torch.set_num_threads(threads)
