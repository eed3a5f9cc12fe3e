"""TRAK without projection in bfloat16 features (review R3 F6): the dual kernel and the scores
come from the same rounded rows, documented in trak's ``feature_dtype``."""

import torch
from torch import nn

from dattri_fn.attribute.trak import (
    classification_margin_loss,
    classification_weight_loss,
    trak,
)
from dattri_fn.model import functional_model

F64 = torch.float64


def _problem():
    g = torch.Generator().manual_seed(6)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64).eval()
    base = functional_model(net).params
    ckpts = [{k: 0.8 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items()}
             for _ in range(2)]
    x, y = torch.randn(24, 5, generator=g, dtype=F64), torch.randint(0, 3, (24,), generator=g)
    return net, ckpts, [(x[:11], y[:11]), (x[11:20], y[11:20])], (x[20:], y[20:])


def _reference(net, ckpts, train, test, lam: float, rounded: bool):
    """s = Qbar_i / C sum_c [(Phi_c Phi_c^T + lam I)^-1 Phi_c Psi_c^T]_ij in float64 from
    autograd's per-example margin gradients, rounded to bfloat16 first when ``rounded``."""
    fm = functional_model(net, classification_margin_loss)
    wm = functional_model(net, classification_weight_loss)

    def rows(p, data):
        x, y = data
        g = torch.func.vmap(torch.func.grad(fm.loss), in_dims=(None, 0))(
            p, (x, y))
        G = torch.cat([v.reshape(x.shape[0], -1) for v in g.values()], 1)
        return G.to(torch.bfloat16).to(F64) if rounded else G

    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    S, q = 0, 0
    for p in ckpts:
        Phi, Psi = rows(p, (x, y)), rows(p, test)
        K = torch.linalg.inv(Phi @ Phi.T + lam * torch.eye(Phi.shape[0], dtype=F64))
        S = S + K @ Phi @ Psi.T
        q = q + torch.func.vmap(wm.loss, in_dims=(None, 0))(p, (x, y))
    return S / len(ckpts) * (q / len(ckpts))[:, None]


def test_bfloat16_rows_unprojected_form_the_kernel_they_score_with():
    """proj_dim=None, feature_dtype=bfloat16, n = 20 < P = 57 (dual form): scores equal the
    float64 closed form on the bfloat16-rounded rows (1e-10 relative), i.e. the Gram is formed
    from the rows it scores with, not from full-precision ones; and are within 2e-2 of the
    unrounded float64 truth (the rounding's effect, stated in trak's docstring)."""
    net, ckpts, train, test = _problem()
    m = trak(functional_model(net, classification_margin_loss),
             weight_fn=functional_model(net, classification_weight_loss), damping=0.05,
             feature_dtype=torch.bfloat16)
    state = m.prepare(ckpts, train)
    assert state.train_features.dtype == torch.bfloat16 and state.train_factors is None
    S = m.score(ckpts, state, None, test)
    want = _reference(net, ckpts, train, test, 0.05, rounded=True)
    scale = float(want.abs().max())
    torch.testing.assert_close(S, want, rtol=0, atol=1e-10 * scale)
    truth = _reference(net, ckpts, train, test, 0.05, rounded=False)
    off = float((S - truth).abs().max()) / float(truth.abs().max())
    assert 1e-5 < off < 2e-2, off
