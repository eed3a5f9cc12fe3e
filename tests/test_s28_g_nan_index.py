"""A NaN training example is named by its index in the data (review RU6 L1), and a saved state
keeps its train print (RU6 M2). Patch G_to_lead.

Math: NaN at global example 20 of batches [8, 8, 8] -> 'example 20', not 'row 4 of the batch'."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import grad_dot, influence, logra


def test_ekfac_and_merged_logra_name_example_20():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    fm = functional_model(model, F.cross_entropy)
    x = torch.randn(24, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    x[20, 1] = float("nan")
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    for m in (influence(fm, solver="ekfac", damping=0.1), logra(fm, proj_dim=2)):
        with pytest.raises(ValueError, match=r"NaN or inf in example 20\."):
            m.prepare(fm.params, batches)
    m = grad_dot(fm)
    with pytest.raises(ValueError, match=r"NaN or inf in example 20\."):
        m.self_score(fm.params, m.prepare(fm.params, batches), batches)


def test_saved_state_keeps_its_train_print(tmp_path):
    """io.save forms a pending print (prepare reads no in-memory data): the loaded state still
    refuses a permuted train by name."""
    from dattri_fn import io
    from dattri_fn.attribute import knn_shapley

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    m = knn_shapley(k=3)
    st = m.prepare({}, (x, y))
    assert st.train_print.numel() == 0
    back = io.load(io.save(st, tmp_path / "knn.pt"))
    assert back.train_print.shape == (24,)
    S = m.score({}, back, (x.clone(), y.clone()), (x[:3], y[:3]))
    assert torch.equal(S, m.score({}, st, None, (x[:3], y[:3])))
    with pytest.raises(ValueError, match=r"knn_shapley\.score\(train=\.\.\.\): expected the rows"):
        m.score({}, back, (x.flip(0), y.flip(0)), (x[:3], y[:3]))
