"""A seeded draw per row (K-FAC/EK-FAC fisher='true', hvp's dropout seed=) reproduces only with
the rows in a fixed order: a shuffled loader there is refused (review RH LOW-2)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_fn import ekfac_factors, functional_model, hvp, kfac_factors

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64).eval()
    x, y = torch.randn(24, 4, dtype=F64), torch.randint(0, 3, (24,))
    p = {k: v.detach() for k, v in model.named_parameters()}
    return model, p, TensorDataset(x, y)


@pytest.mark.parametrize("build", [kfac_factors, ekfac_factors], ids=["kfac", "ekfac"])
def test_true_fisher_refuses_a_shuffled_loader(build):
    # mutation: the fisher == "true" check in kfac_stats removed -> accepted, factors differ
    model, p, ds = _setup()
    with pytest.raises(ValueError, match=build.__name__ + r"\(data=...\): expected the rows in a "
                       r"fixed order.*seeded label draws fall on rows by position.*shuffle=True"):
        build(model, F.cross_entropy, p, DataLoader(ds, batch_size=8, shuffle=True),
              fisher="true", seed=0)


def test_empirical_fisher_and_a_sequential_true_fisher_accepted():
    model, p, ds = _setup()
    kfac_factors(model, F.cross_entropy, p, DataLoader(ds, batch_size=8, shuffle=True))
    seq = DataLoader(ds, batch_size=8)
    a = kfac_factors(model, F.cross_entropy, p, seq, fisher="true", seed=0)
    b = kfac_factors(model, F.cross_entropy, p, seq, fisher="true", seed=0)
    leaves = [(u, v) for u, v in zip(torch.utils._pytree.tree_leaves(a),
                                     torch.utils._pytree.tree_leaves(b), strict=True)
              if isinstance(u, torch.Tensor)]
    assert leaves and all(torch.equal(u, v) for u, v in leaves)


def test_seeded_hvp_refuses_a_shuffled_loader_unseeded_accepts():
    # mutation: hvp's seed check removed -> accepted (each product a different operator)
    model, p, ds = _setup()
    fm = functional_model(model, F.cross_entropy)
    shuffled = DataLoader(ds, batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match=r"hvp\(data=...\): expected the rows in a fixed order.*"
                       r"seeded dropout draws fall on rows by position"):
        hvp(fm.loss, p, shuffled, randomness="different", seed=0)
    hvp(fm.loss, p, shuffled)  # a deterministic sum over rows: any order
