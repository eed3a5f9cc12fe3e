"""Write the numbered notebooks from the Python source in this file, run them, save the outputs.

    python notebooks/make_notebooks.py                # write all five, execute, save with outputs
    python notebooks/make_notebooks.py --no-execute   # write the sources only (outputs dropped)
    python notebooks/make_notebooks.py 03 04          # only the notebooks whose names start so

Each notebook is one string in percent format: a line ``# %%`` opens a code cell and
``# %% [markdown]`` a markdown cell (its text as is, no comment marks). Review and edit the
strings here, never the ``.ipynb`` files: ``tests/test_notebooks.py`` checks that the stored
notebooks hold exactly these sources and that each runs top to bottom in a fresh kernel.

Kernels: :func:`execute` installs a throw-away kernelspec for THIS interpreter in a temporary
directory (no kernelspec of the user's Jupyter dirs is used or written) and puts the repository
root first on the kernel's ``PYTHONPATH``, so a notebook always imports this checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL_NAME = "dattri-fn-python3"
CELL_TIMEOUT_S = 180

# ----------------------------------------------------------------------------------------------
QUICK_START = r'''
# %% [markdown]
# 01 - Quick start: which training images made the model say "3"?

We train a small MLP on scikit-learn's bundled digits (8x8 images, no download), then ask two
attribution methods which training images pushed each test prediction. Every method in
`dattri_fn` returns scores of shape **`[n_train, n_test]`**, and a **positive score marks a
proponent**: up-weighting that training image lowers the test image's loss. Negative scores are
opponents.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_fn import functional_model, gnvp
from dattri_fn.attribute import classification_margin, classification_weight, influence, trak

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16  # pixels in [0, 1]
y = torch.tensor(digits.target)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x_train, y_train = x[perm[:600]], y[perm[:600]]
x_test, y_test = x[perm[600:700]], y[perm[600:700]]
print(f"{len(x_train)} training and {len(x_test)} test images of {x.shape[1]} pixels")

# %% [markdown]
An ordinary `nn.Module`, trained the ordinary way: full-batch Adam on the cross-entropy plus a
small L2 penalty (a second of CPU time).

# %%
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
weight_decay = 1e-3
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(300):
    opt.zero_grad()
    l2 = sum((p * p).sum() for p in model.parameters())
    (F.cross_entropy(model(x_train), y_train) + 0.5 * weight_decay * l2).backward()
    opt.step()
model.eval()
with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean()
print(f"test accuracy {accuracy:.3f}")
assert accuracy > 0.9

# %% [markdown]
## Attribution in ten lines

`functional_model` turns the module and its batch loss into pure functions of a params dict:
`fm.loss(params, example)` for one example, `fm.forward(params, example)` for one output. A
`DataLoader` is streamed batch by batch. The method is an influence function

$$s_{ij} = g_i^\top (G + \lambda I)^{-1} g_j,\qquad g = \nabla_\theta \ell(\theta; z),$$

with conjugate gradient (CG) for the inverse and the Gauss-Newton matrix $G = J^\top H_{out} J$
as the curvature: unlike the Hessian of an MLP it is positive semi-definite, so CG is safe.
The damping $\lambda$ covers the L2 penalty ($10^{-3}$) plus a little more. `top_k=5` keeps a
running top-5 per test image while the training set streams by, without the full matrix.
Passing the model `fm` itself (rather than `fm.loss`) gives the same scores, with the
per-example gradients of its `nn.Linear` layers from one batched backward instead of a `vmap`.

# %%
fm = functional_model(model, F.cross_entropy)
train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=200)
out_loss = lambda out, ex: F.cross_entropy(out[None], ex[1][None])  # one output's loss
gauss_newton = lambda params, data: gnvp(fm.forward, out_loss, params, data)
method = influence(fm, solver="cg", curvature=gauss_newton, damping=1e-2, max_iter=200)
state = method.prepare(fm.params, train_loader)
test = (x_test[:8], y_test[:8])
scores = method.score(fm.params, state, train_loader, test)  # [600, 8]
top = method.score(fm.params, state, train_loader, test, top_k=5)  # TopK(values, indices) [5, 8]
print(scores.shape, top.indices.shape)

# %% [markdown]
The streamed top-5 is the top-5 of the full matrix. Opponents are its bottom-5 (or
`top_k=5, largest=False`). For a trained classifier the strongest proponents of a test image
are training images of the same class; the strongest opponents are images of other classes.

# %%
assert torch.equal(top.indices, scores.topk(5, dim=0).indices)
opponents = scores.topk(5, dim=0, largest=False)
same_class = (y_train[top.indices] == y_test[:8]).float().mean()
opp_same_class = (y_train[opponents.indices] == y_test[:8]).float().mean()
print(f"proponents of the test image's class: {same_class:.0%}; opponents: {opp_same_class:.0%}")
assert same_class >= 0.9 and opp_same_class <= 0.2
assert (top.values > 0).all() and (opponents.values < 0).all()

# %%
def show(rows, title):
    """rows: list of (test index j, proponent indices, opponent indices)."""
    fig, axes = plt.subplots(len(rows), 11, figsize=(11, 1.25 * len(rows)), squeeze=False)
    for r, (j, props, opps) in enumerate(rows):
        images = [(x_test[j], f"test {y_test[j]}")]
        images += [(x_train[i], f"+ {y_train[i]}") for i in props]
        images += [(x_train[i], f"- {y_train[i]}") for i in opps]
        for ax, (img, label) in zip(axes[r], images, strict=True):
            ax.imshow(img.reshape(8, 8), cmap="gray_r")
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.suptitle(title + ": test image | 5 proponents (+) | 5 opponents (-)", fontsize=9)
    plt.show()


show([(j, top.indices[:, j], opponents.indices[:, j]) for j in range(3)],
     "influence function (CG, Gauss-Newton)")

# %% [markdown]
## Same interface, another method: TRAK

TRAK needs only the model's output function (the correct-class margin) and its weight
($1 - p_y$); gradients are randomly projected to `proj_dim` dimensions. Its damping is added to
$\Phi^\top\Phi$, a *sum* over the training set, hence the `0.1 * n_train`. TRAK is designed for
ensembles (`prepare(list_of_params, ...)` averages over models); with one model its scores are
noisier, yet they still agree with the influence function's.

# %%
trak_method = trak(classification_margin(fm.forward), weight_fn=classification_weight(fm.forward),
                   proj_dim=512, damping=0.1 * len(x_train))
trak_state = trak_method.prepare(fm.params, train_loader)
trak_scores = trak_method.score(fm.params, trak_state, train_loader, test)  # [600, 8]
corr = torch.stack([torch.corrcoef(torch.stack([scores[:, j], trak_scores[:, j]]))[0, 1]
                    for j in range(8)])
print("Pearson correlation with the influence scores, per test image:", corr.numpy().round(2))
assert corr.mean() > 0.5
trak_top = trak_scores.topk(5, dim=0).indices
trak_bottom = trak_scores.topk(5, dim=0, largest=False).indices
show([(j, trak_top[:, j], trak_bottom[:, j]) for j in range(3)], "TRAK (one model, d=512)")
'''

# ----------------------------------------------------------------------------------------------
TRANSFORMS = r'''
# %% [markdown]
# 02 - The transforms, each checked against dense linear algebra

Every method in `dattri_fn` is a composition of a few pure transforms: per-sample gradients,
curvature-vector products, inverse solvers and random projections. Here each one meets a dense
float64 reference on a model small enough to write its Hessian down (a 64-6-10 MLP on 200
digits, $P = 460$ parameters), and we print the largest error.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import hessian, jacrev, vmap

from dattri_fn import (
    arnoldi,
    functional_model,
    gnvp,
    hvp,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_lissa,
    make_projector,
    per_sample_grad,
    per_sample_layer_grads,
    project,
    ravel,
)

digits = load_digits()
x = torch.tensor(digits.data[:200], dtype=torch.float64) / 16
y = torch.tensor(digits.target[:200])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
opt = torch.optim.Adam(model.parameters(), lr=0.05)
for _ in range(100):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
model.eval()
fm = functional_model(model, F.cross_entropy)
flat, unravel = ravel(fm.params)  # [P] in named_parameters order, and its inverse
P = flat.numel()
gen = torch.Generator().manual_seed(0)
V = torch.randn(5, P, generator=gen, dtype=torch.float64)  # 5 right-hand sides
print("P =", P)

# %% [markdown]
## 1. Per-sample gradients: `vmap(grad)` vs a loop of `autograd.grad`

# %%
G = per_sample_grad(fm.loss, fm.params, (x, y))  # [200, P], one vmap call
params = list(model.parameters())
G_loop = torch.stack([
    torch.cat([g.reshape(-1) for g in
               torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)])
    for i in range(len(y))])
err = (G - G_loop).abs().max()
print(f"per_sample_grad: max error {err:.1e}")
assert err < 1e-12

# %% [markdown]
For `nn.Linear` layers the per-sample gradient is an outer product, $dW_i = g_i a_i^\top$ (layer
output-gradient times input), so `per_sample_layer_grads` keeps only the pairs $(a_i, g_i)$,
from one batched forward and backward, and inner products never form $G$:
$\langle \nabla_i, \nabla_j \rangle = \sum_\text{layers} (\tilde a_i \cdot \tilde a_j)(g_i \cdot g_j)$
with $\tilde a = [a, 1]$ for the bias.

# %%
lg = per_sample_layer_grads(fm, fm.params, (x, y))
print({name: (tuple(a.shape), tuple(g.shape)) for name, (a, g) in lg.factors.items()})
err = max((lg.to_dense()[0] - G).abs().max(), (lg.scores(lg) - G @ G.T).abs().max())
print(f"per_sample_layer_grads: max error {err:.1e}")
assert err < 1e-12

# %% [markdown]
## 2. Curvature products vs `torch.func.hessian`

`hvp` gives $V \mapsto HV$ for the Hessian of the mean loss without forming $H$, by
forward-over-reverse or reverse-over-reverse differentiation. `gnvp` gives the Gauss-Newton
$G = \frac1N\sum_i J_i^\top H^{out}_i J_i$ (for softmax cross-entropy
$H^{out} = \mathrm{diag}(p) - pp^\top$), checked against Jacobians from `jacrev`.

# %%
mean_loss = lambda f: vmap(fm.loss, in_dims=(None, 0))(unravel(f), (x, y)).mean()
H = hessian(mean_loss)(flat)  # dense [P, P]
for mode in ("fwd-rev", "rev-rev"):
    err = (hvp(fm.loss, fm.params, (x, y), mode=mode)(V) - V @ H).abs().max()
    print(f"hvp {mode}: max error {err:.1e}")
    assert err < 1e-12

J = vmap(jacrev(lambda f, ex: fm.forward(unravel(f), ex)), in_dims=(None, 0))(flat, (x, y))
p = torch.softmax(vmap(fm.forward, in_dims=(None, 0))(fm.params, (x, y)), -1)  # [N, 10]
H_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
GN = torch.einsum("nkp,nkl,nlq->pq", J, H_out, J) / len(y)
out_loss = lambda out, ex: F.cross_entropy(out[None], ex[1][None])
err = (gnvp(fm.forward, out_loss, fm.params, (x, y))(V) - V @ GN).abs().max()
print(f"gnvp: max error {err:.1e}")
assert err < 1e-12

eig_H, eig_GN = torch.linalg.eigvalsh(H), torch.linalg.eigvalsh(GN)
print(f"Hessian eigenvalues in [{eig_H[0]:.2e}, {eig_H[-1]:.2e}]: indefinite")
print(f"Gauss-Newton eigenvalues in [{eig_GN[0]:.1e}, {eig_GN[-1]:.2e}]: semi-definite")
assert eig_H[0] < 0 and eig_GN[0] > -1e-12

# %% [markdown]
## 3. Inverse curvature products vs `torch.linalg.solve`

Influence functions need $(H + \lambda I)^{-1} V$. The Hessian above has a negative eigenvalue,
so the damping must exceed $-\lambda_{\min}$ for the damped matrix to be positive definite,
which CG and LiSSA require. Each solver takes the *operator* `hvp(...)` and returns an
operator; none of them ever sees $H$.

* CG: exact up to its residual tolerance `rtol`;
* LiSSA: the Neumann recursion $h_j = v + (I - (H+\lambda I)/s)\,h_{j-1}$, which contracts by
  $1 - (\lambda_{\min} + \lambda)/s$ per step when the scale $s > \lambda_{\max} + \lambda$;
* Arnoldi: exact at full rank; its value is that the top eigenpairs converge after a few
  dozen operator calls (checked below with 40 calls).

# %%
damping = float(-eig_H[0]) + 0.1
X = torch.linalg.solve(H + damping * torch.eye(P, dtype=torch.float64), V.T).T
op = hvp(fm.loss, fm.params, (x, y), mode="rev-rev")
scale = float(eig_H.abs().max()) + damping + 0.5
solvers = {
    "cg": ihvp_cg(op, damping=damping, rtol=1e-12),
    "lissa": ihvp_lissa(lambda batch: hvp(fm.loss, fm.params, batch, mode="rev-rev"), (x, y),
                        damping=damping, scale=scale, depth=300),
    "arnoldi (rank P)": ihvp_arnoldi(op, damping=damping, rank=P, max_iter=P),
}
for name, ihvp in solvers.items():
    err = (ihvp(V) - X).abs().max() / X.abs().max()
    print(f"{name:17s} max relative error {err:.1e}")
    assert err < 1e-9

top_by_magnitude = eig_H[eig_H.abs().argsort(descending=True)][:5]
err = (arnoldi(op, max_iter=40).values[:5] - top_by_magnitude).abs().max()
print(f"arnoldi, 40 steps: top-5 eigenvalues max error {err:.1e}")
assert err < 1e-10
# the same Krylov dimension in 5 operator calls of 8 rows (block Arnoldi)
err = (arnoldi(op, max_iter=40, block_size=8).values[:5] - top_by_magnitude).abs().max()
print(f"block arnoldi, 5 calls of 8: top-5 eigenvalues max error {err:.1e}")
assert err < 1e-6

# %% [markdown]
## 4. Random projections preserve inner products

`project` multiplies by a seeded $P \times d$ matrix $R$ with $\mathbb E[RR^\top] = I$, so
$\langle R^\top g_i, R^\top g_j\rangle$ is an unbiased estimate of $\langle g_i, g_j\rangle$.
For the Gaussian kind its variance is $(\|g_i\|^2\|g_j\|^2 + \langle g_i, g_j\rangle^2)/d$, so
the error relative to $\|g_i\|\|g_j\|$ has root-mean-square at most $\sqrt{2/d}$ (Rademacher
and the sparse SJLT do no worse). The projection itself is exact: the same seed always gives
the same $R$.

# %%
G50 = G[:50]
norms = G50.norm(dim=1)
exact = G50 @ G50.T
dims = [16, 64, 256, 1024]
rms = {}
for kind in ("gaussian", "rademacher", "sjlt"):
    rms[kind] = []
    for d in dims:
        Z = project(G50, proj_dim=d, kind=kind, seed=0)  # [50, d]
        rel = (Z @ Z.T - exact) / (norms[:, None] * norms[None, :])
        rms[kind].append(float(rel.pow(2).mean().sqrt()))
    print(kind.ljust(10), " ".join(f"d={d}: {e:.3f}" for d, e in zip(dims, rms[kind], strict=True)))
    assert all(e < 1.25 * (2 / d) ** 0.5 for d, e in zip(dims, rms[kind], strict=True))

R = make_projector(P, proj_dim=64, kind="gaussian", seed=0, dtype=torch.float64).matrix()
err = (project(G50, proj_dim=64, kind="gaussian", seed=0) - G50 @ R).abs().max()
print(f"project == X @ R: max error {err:.1e}")
assert err < 1e-12

plt.figure(figsize=(4.5, 3))
for kind, errs in rms.items():
    plt.loglog(dims, errs, "o-", label=kind)
plt.loglog(dims, [(2 / d) ** 0.5 for d in dims], "k--", label=r"$\sqrt{2/d}$")
plt.minorticks_off()
plt.xticks(dims, [str(d) for d in dims])
plt.yticks([0.03, 0.1, 0.3], ["0.03", "0.1", "0.3"])
plt.xlabel("proj_dim d")
plt.ylabel("rms relative error")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()
'''

# ----------------------------------------------------------------------------------------------
NEW_METHOD = r'''
# %% [markdown]
# 03 - A new method in 30 lines: projected influence functions

Influence functions restricted to a random $d$-dimensional subspace $\theta + Ra$ of parameter
space ($R \in \mathbb R^{P\times d}$ a seeded random matrix):

$$s_{ij} = (R^\top g_i)^\top \big(R^\top (G + \lambda I) R\big)^{-1} (R^\top g_j).$$

It needs $d$ Gauss-Newton products once, then works with $d$-dimensional features only. At
$d = P$ the square $R$ is invertible and $R(R^\top A R)^{-1}R^\top = A^{-1}$: the method *is*
the influence function. We write it from the library's transforms (`per_sample_grad`, `gnvp`,
`make_projector`) and its streaming pipeline (`stream_scores`, `stream_self`), wrap it in a
`Method` like every built-in one, and measure it by the linear datamodeling score (LDS)
against models retrained on random halves of the data.

# %%
import os
import tempfile
from itertools import pairwise

import matplotlib.pyplot as plt
import torch

from dattri_fn import functional_model, gnvp, make_projector, num_params, per_sample_grad
from dattri_fn.attribute import Method, grad_dot, influence, stream_scores
from dattri_fn.attribute.pipeline import stream_self
from dattri_fn.eval.metrics import brittleness, brittleness_curve, lds
from dattri_fn.eval.plots import plot_brittleness, plot_lds
from dattri_fn.eval.retrain import lds_ground_truth, make_predict_fn
from dattri_fn.eval.tasks import get_task, train_model

# %%
def projected_influence(loss, forward, out_loss, *, proj_dim, damping, seed=0):
    """Return IF restricted to span(R): s_ij = g_i^T R (R^T (G + damping I) R)^-1 R^T g_j."""
    name = "projected_if"

    def prepare(params, train):
        v = next(iter(params.values()))
        R = make_projector(num_params(params), proj_dim=proj_dim, seed=seed,
                           dtype=v.dtype, device=v.device).matrix()  # [P, d]
        GR = gnvp(forward, out_loss, params, train)(R.T).T  # [P, d]: d products, once
        R64 = R.double()  # the d x d system can be ill-conditioned in float32
        K = R64.T @ GR.double() + damping * R64.T @ R64  # [d, d]
        return R, torch.linalg.cholesky((K + K.T) / 2)

    def features(params, state):
        R, L = state
        train_f = lambda b: per_sample_grad(loss, params, b) @ R  # [b, d]
        test_f = lambda b: torch.cholesky_solve(train_f(b).T.double(), L).T.to(R.dtype)
        return train_f, test_f

    def score(params, state, train, test, *, top_k=None, largest=True):
        train_f, test_f = features(params, state)
        return stream_scores(train_f, train, test_f(test), top_k=top_k, largest=largest,
                             func=name)

    def self_score(params, state, train):
        return stream_self(*features(params, state), train, device=state[0].device, func=name)

    return Method(prepare, score, self_score, name)

# %% [markdown]
## The task and its ground truth

Multinomial logistic regression on digits ($P = 650$), 500 training and 50 test images, trained
to convergence on mean cross-entropy $+\frac{\lambda}{2}\|\theta\|^2$ (so the damping is that
$\lambda$). The ground truth: 50 models retrained on random halves of the training set and the
test margins they reach; LDS is the Spearman correlation, per test image, between the margins
and the summed scores of each half. Retrained models are cached in a temporary directory, so a
second run is instant.

# %%
task = get_task("digits-lr", n_train=500, n_test=50)
model = train_model(task)
truth = lds_ground_truth(task, m=50, progress=False,
                         cache_dir=os.path.join(tempfile.gettempdir(), "dattri_fn_notebooks"))
fm = functional_model(model, task.loss_fn)
weight_decay = task.hparams["weight_decay"]
out_loss = lambda out, ex: task.loss_fn(out[None], ex[1][None])
train = [(task.x_train[i:i + 250], task.y_train[i:i + 250]) for i in (0, 250)]
test = (task.x_test, task.y_test)
print("P =", num_params(fm.params), "| subsets", tuple(truth.subsets.shape),
      "| targets", tuple(truth.targets.shape))

# %% [markdown]
## Compare with two existing methods

The full influence function (CG on the same Gauss-Newton curvature) and Grad-Dot (no
curvature at all).

# %%
gauss_newton = lambda params, data: gnvp(fm.forward, out_loss, params, data)
baselines = {
    "influence (CG)": influence(fm.loss, solver="cg", curvature=gauss_newton,
                                damping=weight_decay, max_iter=300, rtol=1e-6),
    "grad-dot": grad_dot(fm.loss),
}
P = num_params(fm.params)
methods = {f"projected d={d}": projected_influence(fm.loss, fm.forward, out_loss, proj_dim=d,
                                                   damping=weight_decay)
           for d in (32, 64, 128, 256, P)}
scores, results = {}, {}
for name, m in {**methods, **baselines}.items():
    state = m.prepare(fm.params, train)
    scores[name] = m.score(fm.params, state, train, test)  # [500, 50]
    results[name] = lds(scores[name], truth.subsets, truth.targets)
    lo, hi = results[name].ci95
    print(f"{name:18s} LDS {results[name].mean:.3f}  (95% CI {lo:.3f} .. {hi:.3f})")

# %% [markdown]
What the numbers say, checked:

* at $d = P$ the projected method reproduces the influence function's scores (up to float32
  round-off, which the conditioning of the square random $R$ amplifies);
* its LDS grows with $d$;
* already at $d = 256$ it beats Grad-Dot, at less than half the feature size of the gradients;
* `self_score` is the diagonal of `score(train, train)`, as for every `Method`.

# %%
full, exact = scores[f"projected d={P}"], scores["influence (CG)"]
rel = (full - exact).abs().max() / exact.abs().max()
print(f"d = P vs influence (CG): max relative difference {rel:.1e}")
assert rel < 1e-2
curve = [float(results[f"projected d={d}"].mean) for d in (32, 64, 128, 256, P)]
assert all(a < b for a, b in pairwise(curve))
assert results["projected d=256"].mean > results["grad-dot"].mean

m = methods["projected d=128"]
state = m.prepare(fm.params, train)
few = (task.x_train[:20], task.y_train[:20])
diag = m.score(fm.params, state, few, few).diagonal()
assert torch.allclose(m.self_score(fm.params, state, few), diag, rtol=1e-5)

dims = [32, 64, 128, 256, P]
plt.figure(figsize=(4.5, 3))
plt.semilogx(dims, curve, "o-", label="projected IF")
plt.minorticks_off()
plt.xticks(dims, [str(d) for d in dims])
plt.axhline(results["influence (CG)"].mean, color="k", ls="--", label="influence (CG)")
plt.axhline(results["grad-dot"].mean, color="gray", ls=":", label="grad-dot")
plt.xlabel("proj_dim d")
plt.ylabel("LDS")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
## Per test image, and by removal

The mean LDS hides a spread: `lds` keeps each test image's correlation (`per_test`, with its
p-value), and `plot_lds` draws them sorted, with the mean and its 95% interval as a band.
Brittleness asks a different question of the same scores: how many of a test image's top
proponents must be removed, and the model retrained without them, before its prediction
flips? `brittleness` retrains at each `k` until the first flip; `plot_brittleness` draws the
share of test images flipped by removing at most `k` (a better method flips more with fewer).
Eight test images, five removal sizes, two methods: at most 80 L-BFGS retrainings.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.2))
for name in ("influence (CG)", "projected d=256", "grad-dot"):
    plot_lds(results[name], ax=left, label=name)
ks = (5, 10, 20, 40, 80)
flips, area = {}, {}
for name in ("influence (CG)", "grad-dot"):
    runs = [brittleness(scores[name][:, j], make_predict_fn(task, j), ks) for j in range(8)]
    flips[name] = [r.smallest_k for r in runs]
    area[name] = float(brittleness_curve(runs, ks)[1].sum())  # test images flipped, summed over k
    plot_brittleness(runs, ks=ks, ax=right, label=name)
plt.tight_layout()
plt.show()
print("smallest k that flips each test image (None: not within 80):", flips)
print("flipped share summed over k:", area)
assert area["influence (CG)"] >= area["grad-dot"]
'''

# ----------------------------------------------------------------------------------------------
NOISY_LABELS = r'''
# %% [markdown]
# 04 - Finding flipped labels with self-influence

We flip 10% of the training labels of the digits MLP task and rank the training images by
**self-influence**, `self_score`: the score of an example on its own loss, the diagonal of
`score(train, train)` computed without the matrix. A mislabelled image disagrees with its
neighbours, so the model has to bend to fit it: its gradient is large and points where the
curvature is small, and its self-influence is high. Inspecting images from the highest
self-influence down should find the flipped ones much sooner than inspecting at random.

# %%
import matplotlib.pyplot as plt
import torch

from dattri_fn.app.recipes import recipe
from dattri_fn.eval.metrics import noisy_label_detection
from dattri_fn.eval.plots import plot_roc
from dattri_fn.eval.tasks import get_task, train_model

task = get_task("digits-mlp", n_train=500, n_test=10, noisy=True)
clean_labels = get_task("digits-mlp", n_train=500, n_test=10).y_train  # same split, unflipped
model = train_model(task)
with torch.no_grad():
    fit = (model(task.x_train).argmax(1) == task.y_train).float().mean()
print(f"{int(task.flipped.sum())} of {task.n_train} labels flipped; "
      f"the model fits {fit:.1%} of the (noisy) training labels")
assert int(task.flipped.sum()) == task.n_train // 10
assert torch.equal(task.flipped, task.y_train != clean_labels)

# %% [markdown]
## Self-influence from three methods

The recipes configure each method for the task: the influence function with an Arnoldi
low-rank inverse of the Gauss-Newton curvature, Grad-Dot ($\|g_i\|^2$) and TRAK. Each is
`prepare` then `self_score`. `noisy_label_detection` returns the ROC-AUC of the ranking and the
fraction of flipped labels found within the top 5, 10, 20 and 30%.

# %%
self_influence, detection = {}, {}
for name in ("if-arnoldi", "grad-dot", "trak"):
    r = recipe(name, task, [model])
    state = r.method.prepare(r.params, r.train)
    self_influence[name] = r.method.self_score(r.params, state, r.train)  # [500]
    detection[name] = noisy_label_detection(self_influence[name], task.flipped)
    found = detection[name].found_fraction_at
    print(f"{name:10s} AUC {detection[name].auc:.3f} | found in top 10%: {found[0.1]:.0%}, "
          f"top 20%: {found[0.2]:.0%}")

# Random inspection: 200 seeded random orders, averaged.
random_scores = torch.rand(200, task.n_train, generator=torch.Generator().manual_seed(0))
random_runs = [noisy_label_detection(s, task.flipped) for s in random_scores]
random_auc = torch.stack([r.auc for r in random_runs]).mean()
random_found = torch.stack([r.found_fraction_at[0.1] for r in random_runs]).mean()
print(f"{'random':10s} AUC {random_auc:.3f} | found in top 10%: {random_found:.0%} "
      "(mean of 200 random orders)")

# %% [markdown]
## The detection curve

Fraction of the flipped labels found against the fraction of the training set inspected. A
random inspection order finds them in proportion to the effort (the diagonal; dotted: the mean
of 200 random orders); a good self-influence ranking rises steeply at first.

# %%
def found_curve(score):
    hits = task.flipped[score.argsort(descending=True)].float()
    return torch.cat([torch.zeros(1), hits.cumsum(0) / hits.sum()])


inspected = torch.linspace(0, 1, task.n_train + 1)
plt.figure(figsize=(4.5, 3.2))
for name, s in self_influence.items():
    plt.plot(inspected, found_curve(s), label=f"{name} (AUC {detection[name].auc:.2f})")
random_curve = torch.stack([found_curve(s) for s in random_scores]).mean(0)
plt.plot(inspected, random_curve, "k:", label=f"random order (AUC {random_auc:.2f})")
plt.xlabel("fraction of training set inspected")
plt.ylabel("fraction of flipped labels found")
plt.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
The same rankings as ROC curves (`plot_roc` from `dattri_fn.eval.plots`, one call per method on
shared axes): the true positive rate (flipped labels flagged) against the false positive rate
(clean labels flagged) as the self-influence threshold falls; the AUC above is its area.

# %%
ax = None
for name in self_influence:
    ax = plot_roc(detection[name], ax=ax, label=name)
plt.tight_layout()
plt.show()

# %% [markdown]
The best method beats random inspection clearly: an AUC far above 0.5, and within the first 10%
inspected it finds at least half of the flipped labels where random inspection finds about 10%.

# %%
best = max(self_influence, key=lambda name: detection[name].auc)
print("best:", best)
assert abs(random_auc - 0.5) < 0.03 and abs(random_found - 0.1) < 0.03
assert detection[best].auc > 0.9
assert detection[best].found_fraction_at[0.1] >= 0.5

# %%
top = self_influence[best].argsort(descending=True)[:10]
fig, axes = plt.subplots(1, 10, figsize=(10, 1.6))
for ax, i in zip(axes, top, strict=True):
    ax.imshow(task.x_train[i].reshape(8, 8), cmap="gray_r", vmin=-0.5, vmax=1.5)
    flag = "FLIPPED" if task.flipped[i] else "ok"
    ax.set_title(f"{task.y_train[i]} (true {clean_labels[i]})\n{flag}", fontsize=7)
    ax.axis("off")
fig.suptitle(f"highest self-influence ({best}): given label (true label); "
             "standardised pixels", fontsize=9)
plt.show()
'''

# ----------------------------------------------------------------------------------------------
TESTING_YOUR_OWN = r'''
# %% [markdown]
# 05 - Testing your own primitive: a Neumann-series solver and a new method, checked by the kit

`dattri_fn.testing` is the kit dattri_fn's own test suite runs on, shipped for people who write
their own inverse-HVP solvers, curvature operators, projections or attribution methods:

* **problems with known answers**, as the `(params, loss, data)` every transform takes:
  least squares and ridge regression (exact leave-one-out in closed form), logistic regression,
  a tanh MLP (indefinite Hessian), a conv net and a token-sequence model, each with its dense
  Hessian, Gauss-Newton and empirical Fisher and the exact influence $g_i^\top (C + \lambda I)^{-1} g_j$;
* **contract checks** (`check_inverse`, `check_linop`, `check_projector`, `check_method`): one call,
  an `AssertionError` that names the violated property and the worst case;
* **hypothesis strategies** (`dattri_fn.testing.strategies`, the `[testing]` extra) that draw
  those problems and random operators by sizes and seeds.

Below we write a new solver and a new method in a few lines each, check them, and watch a
deliberately wrong version of each get caught.

# %%
import warnings

import matplotlib.pyplot as plt
import torch
from hypothesis import given, settings

from dattri_fn import LinOp, as_linop, hvp, per_sample_grad
from dattri_fn.attribute import Method, collect, stream_scores, stream_self
from dattri_fn.testing import check_inverse, check_method, exact_loo, ridge_regression
from dattri_fn.testing.strategies import problems

# %% [markdown]
## A new solver: the Neumann series

For a positive-definite $M = A + \lambda I$ and a scale $s \ge \lambda_{\max}(M)$,
$$M^{-1} v = \frac1s \sum_{t \ge 0} \Big(I - \frac{M}{s}\Big)^t v ,$$
which converges at the rate $1 - \lambda_{\min}(M)/s$. A solver in dattri_fn is a function
`solver(op, damping=...)` returning a `LinOp` (`[k, P] -> [k, P]`); ours estimates $s$ by power
iteration, sums terms until they stop mattering and **says so** (a warning) when the series
did not converge, e.g. on an indefinite or singular operator.

# %%
def neumann(*, rtol=1e-10, max_iter=5_000, forget_damping=False):
    """Return solver(op, damping) -> V -> (op + damping I)^-1 V by the Neumann series."""

    def solver(op, damping=0.0):
        A = as_linop(op)
        lam = 0.0 if forget_damping else damping  # the planted bug below
        M = lambda V: A(V) + lam * V
        v = torch.randn(1, A.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        v = v.to(dtype=A.dtype, device=A.device)
        for _ in range(50):  # power iteration: s = 1.1 |lambda|_max
            v = M(v) / M(v).norm()
        s = 1.1 * float(M(v).norm())
        tol = max(rtol, 100 * torch.finfo(A.dtype).eps)

        def apply(V):
            term = V / s
            x = term.clone()
            for t in range(max_iter):
                term = term - M(term) / s
                x = x + term
                if t % 10 == 0 and not bool(torch.isfinite(x).all()):
                    break
                # the tail after t terms is ~ |term| s / lambda_min: stop well below tol
                if t % 10 == 0 and bool((term.norm(dim=-1) <= 1e-2 * tol * x.norm(dim=-1)).all()):
                    break
            resid = (M(x) - V).norm(dim=-1) / V.norm(dim=-1).clamp_min(1e-300)
            if not bool(torch.isfinite(resid).all()) or float(resid.max()) > 1e3 * tol:
                warnings.warn(f"neumann: relative residual {float(resid.max()):.1e} after "
                              f"{t + 1} terms: op + damping I is ill-conditioned (raise "
                              "max_iter or damping) or not positive definite.", RuntimeWarning,
                              stacklevel=3)
            return x

        return LinOp(apply, A.dim, A.dtype, A.device, name="neumann")

    return solver

# %% [markdown]
`check_inverse` solves seeded random systems (positive definite, dense and behind a `LinOp`
that only multiplies, float64 and float32) against `torch.linalg.solve`, checks rows, vectors
and determinism, and requires the solver to be accurate or loud on an indefinite and on a
singular operator:

# %%
check_inverse(neumann(), rtol=1e-8, name="neumann")
print("neumann keeps the inverse contract")

# %% [markdown]
A wrong version: the series forgets the damping. It still converges, to $A^{-1}v$, so nothing
crashes; the check names the property and the worst row:

# %%
try:
    check_inverse(neumann(forget_damping=True), rtol=1e-8, name="neumann_without_damping")
    raise RuntimeError("the planted bug was not caught")
except AssertionError as e:
    print(e)
    assert "linalg.solve" in str(e)

# %% [markdown]
## A new method: influence through the Neumann solver

A `Method` is `(prepare, score, self_score, name)`. Ours inverts the Hessian of the mean loss
(from `hvp`, made dense once since $P$ is tiny here) with the solver above, and streams the
scores with the library's pipeline; it takes one batch, a list of batches or a DataLoader
like the built-in methods.

# %%
def neumann_influence(loss, *, damping, self_score_bug=False):
    """s_ij = g_i^T (H + damping I)^-1 g_j with the Neumann solver."""
    name = "neumann_influence"

    def prepare(params, train):
        H = hvp(loss, params, train).dense()  # P is tiny here: P products once, then matmuls
        return neumann()(H, damping=damping)  # the inverse, a LinOp

    def grads(params):
        return lambda batch: per_sample_grad(loss, params, batch)  # [b, P]

    def score(params, inverse, train, test, *, top_k=None, largest=True):
        test_rows = inverse(collect(grads(params), test))  # [n_test, P]
        return stream_scores(grads(params), train, test_rows, top_k=top_k, largest=largest)

    def self_score(params, inverse, train):
        g = grads(params)
        test_side = g if self_score_bug else (lambda batch: inverse(g(batch)))
        return stream_self(g, test_side, train)

    return Method(prepare, score, self_score, name)

# %% [markdown]
`check_method` runs it on a problem with known answers: the self-scores are the diagonal of
the scores; one batch, lists of batches and a DataLoader give the same scores; `top_k` is
`torch.topk` of the full matrix; a duplicated training point scores like its original and
positively; and on a convex problem fitted at its minimiser the scores correlate with the
**exact leave-one-out** (refitted in closed form) at least `min_loo_corr` (default 0.85; the
exact influence reaches 0.92 or more on the kit's fitted problems, Grad-Dot 0.25-0.82 on
ill-conditioned ones). `ridge_regression` is fitted; for a classifier use
`logistic_regression(fit=True, l2=0.05)`. The result lists what was checked and what was
skipped (on a problem that is not fitted, the leave-one-out property is skipped with a warning):

# %%
problem = ridge_regression(n=32, dim=3, seed=0, l2=0.05, cond=10.0)  # features scaled 1..10
method = neumann_influence(problem.loss, damping=1e-3)
result = check_method(method, problem)
print("neumann_influence keeps the method contract on", problem)
print("checked:", result.checked, "skipped:", result.skipped)

# %% [markdown]
A wrong version forgets the inverse in `self_score` (it returns $|g_i|^2$):

# %%
try:
    check_method(neumann_influence(problem.loss, damping=1e-3, self_score_bug=True), problem)
    raise RuntimeError("the planted bug was not caught")
except AssertionError as e:
    print(e)
    assert "self_score == diag" in str(e)

# %% [markdown]
What each check can see: a missing damping gives another valid method, so `check_method`
passes it while `check_inverse` (above) catches it on the solver; and a "transposed" symmetric
Kronecker factor is the same operator, so no check can fail it (`check_linop` catches an
asymmetric one). Check the solver with `check_inverse` and the method with `check_method`.

# %% [markdown]
## Property tests: many problems, drawn by hypothesis

`problems()` draws a problem kind, its sizes, its conditioning and a seed (never raw float
arrays), so a failure prints a reproducible draw. Here the method must keep its contract on
fitted ridge and logistic regressions of random sizes. Some draws have features scaled by
up to 30, and our series then stops at `max_iter` short of `rtol`: it says so (the warnings
below), and the scores still agree with the exact leave-one-out.

# %%
@given(problem=problems(kinds=("ridge", "logistic"), fitted=True))
@settings(max_examples=5, derandomize=True, deadline=None, database=None)
def test_neumann_influence(problem):
    check_method(neumann_influence(problem.loss, damping=1e-3), problem)


test_neumann_influence()
print("5 drawn problems passed")

# %% [markdown]
What the LOO check measures: each point is a (train $i$, test $j$) pair of the ridge problem,
the exact change of test $j$'s loss when train $i$ is removed against the method's score
(first order: score $/ n$).

# %%
scores = method.score(problem.params, method.prepare(problem.params, problem.data),
                      problem.data, problem.data)
loo = exact_loo(problem)
r = float(torch.corrcoef(torch.stack([scores.flatten(), loo.flatten()]))[0, 1])
plt.figure(figsize=(4, 3.2))
plt.scatter(scores.flatten() / problem.n, loo.flatten(), s=8)
lim = float(loo.abs().max()) * 1.1
plt.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
plt.xlabel("Neumann influence / n")
plt.ylabel("exact leave-one-out")
plt.title(f"ridge, n = {problem.n}: Pearson r = {r:.3f}", fontsize=9)
plt.tight_layout()
plt.show()
assert r > 0.85
'''

# ----------------------------------------------------------------------------------------------
LANGUAGE_MODELS = r'''
# %% [markdown]
# 06 - Which training documents made a language model say this?

A small causal transformer (`TinyLM`, one pre-LN block, 32-dim) is trained on the bundled text:
docstrings of Python's standard library, characters as tokens, no download. We ask which
training sequences most lowered the loss of a few test sequences, with two methods that work on
any model through the capture engine (no hooks, no model changes):

* **EK-FAC influence**: `influence(fm, solver="ekfac")`, kronfluence's method;
* **LoGra**: `logra(fm, proj_dim=k)`, each layer's gradient projected to `k x k` before the
  inverse (Choe et al. 2024), so memory is `O(B k^2)` per layer instead of `O(B P)`.

Both score `[n_train, n_test]`, positive = proponent. Then we check them against retraining
(LDS) and split one score over the tokens of a training sequence.

# %%
import torch

from dattri_fn.attribute import influence, logra, token_scores
from dattri_fn.eval.metrics import lds
from dattri_fn.eval.retrain import lds_ground_truth
from dattri_fn.eval.tasks import VOCAB, get_task, train_model
from dattri_fn.model import functional_model
from dattri_fn.transforms.layer_grads import per_sample_layer_grads

torch.manual_seed(0)
task = get_task("text-lm", n_train=96, n_test=6, seed=0)
model = train_model(task, seed=0).eval()
decode = lambda ids: "".join(VOCAB[int(i)] for i in ids)
print(task.x_train.shape, "training sequences of", task.x_train.shape[1], "characters")
print(repr(decode(task.x_test[0])))

# %% [markdown]
The attributed parameters are the block's Linear layers (attention and MLP): the capture engine
factors them; the embeddings and LayerNorms stay fixed (a choice kronfluence makes too).

# %%
linear = lambda name: name.split(".")[0] in ("qkv", "proj", "fc1", "fc2", "head")
fm = functional_model(model, task.loss_fn, params=linear)
train = [(task.x_train[i:i + 32], task.y_train[i:i + 32]) for i in range(0, 96, 32)]
test = (task.x_test, task.y_test)
ek = influence(fm, solver="ekfac", damping=1e-3)
ek_state = ek.prepare(fm.params, train)
S_ek = ek.score(fm.params, ek_state, train, test)                      # [96, 6]
lg = logra(fm, proj_dim=8)                                              # 64 features per layer
S_lg = lg.score(fm.params, lg.prepare(fm.params, train), train, test)   # [96, 6]
print("P =", sum(v.numel() for v in fm.params.values()), "| LoGra features per example:",
      sum(QA.shape[0] * QG.shape[0] for QA, QG in lg.prepare(fm.params, train).eigvecs.values()))
print("correlation EK-FAC vs LoGra:", float(torch.corrcoef(torch.stack([S_ek.flatten(),
                                                                      S_lg.flatten()]))[0, 1]))

# %% [markdown]
## The strongest proponents, side by side with the query

Characters a proponent shares with the query in runs of four or more are marked with `[...]`.

# %%
def shared(doc: str, query: str, n: int = 4) -> str:
    grams = {query[i:i + n] for i in range(len(query) - n + 1)}
    marks = [False] * len(doc)
    for i in range(len(doc) - n + 1):
        if doc[i:i + n] in grams:
            marks[i:i + n] = [True] * n
    out, inside = "", False
    for c, m in zip(doc, marks, strict=True):
        if m != inside:
            out += "[" if m else "]"
            inside = m
        out += c
    return out + ("]" if inside else "")


for j in range(2):
    query = decode(task.x_test[j])
    print(f"query {j}: {query!r}")
    for rank, i in enumerate(S_ek[:, j].topk(3).indices.tolist()):
        print(f"  EK-FAC #{rank + 1} (train {i}, score {float(S_ek[i, j]):+.3g}): "
              f"{shared(decode(task.x_train[i]), query)!r}")
    print()

# %% [markdown]
## Do the scores predict retraining? (LDS)

We retrain the model on 16 random halves of the training set (cached under `.cache/`, about
half a minute the first time on 2 cores) and correlate each method's predicted change of the
test targets with the real one.

# %%
gt = lds_ground_truth(task, 16, seed=0, progress=False)
for name, S in (("EK-FAC", S_ek), ("LoGra k=8", S_lg)):
    r = lds(S, gt.subsets, gt.targets.to(S.dtype))
    print(f"{name:10s} LDS {float(r.mean):.3f}  95% CI [{float(r.ci95[0]):.3f}, {float(r.ci95[1]):.3f}]")

# %% [markdown]
## Which characters of a proponent carried its score?

Influence is linear in the training gradient, and a sequence's gradient is a sum over its
positions, so a score splits exactly over the tokens of the training sequence
(`token_scores`, kronfluence's per-token scores). The query's preconditioned gradient comes from
the EK-FAC state; the per-token scores sum back to the score above.

# %%
G_q = per_sample_layer_grads(fm, fm.params, test).to_dense()[0]          # [6, P]
top = int(S_ek[:, 0].argmax())
tok = token_scores(fm, fm.params, (task.x_train[top:top + 1], task.y_train[top:top + 1]),
                   ek_state.ihvp(G_q[:1]))[0, :, 0]                        # [T]
assert torch.allclose(tok.sum(), S_ek[top, 0], rtol=1e-3, atol=1e-6 * float(S_ek.abs().max()))
doc = decode(task.x_train[top])
strongest = tok.topk(8).indices.sort().values.tolist()
print("proponent:", repr(doc))
print("its 8 strongest positions:", [(p, doc[p]) for p in strongest])

# %%
import matplotlib.pyplot as plt

plt.figure(figsize=(7.5, 2.4))
plt.bar(range(len(doc)), tok.detach().numpy())
plt.xticks(range(len(doc)), [c if c.strip() else repr(c)[1:-1] for c in doc], fontsize=7)
plt.ylabel("share of the score")
plt.title("per-token split of the top proponent's EK-FAC score (query 0)", fontsize=9)
plt.tight_layout()
plt.show()
'''

NOTEBOOKS = {
    "01_quick_start.ipynb": QUICK_START,
    "02_transforms.ipynb": TRANSFORMS,
    "03_new_method.ipynb": NEW_METHOD,
    "04_noisy_labels.ipynb": NOISY_LABELS,
    "05_testing_your_own.ipynb": TESTING_YOUR_OWN,
    "06_language_models.ipynb": LANGUAGE_MODELS,
}


# ----------------------------------------------------------------------------------------------
def cells_from_percent(source: str) -> list[tuple[str, str]]:
    """Return ``[(kind, text)]`` from percent-format source, ``kind`` in ``{"code", "markdown"}``.

    A line ``# %%`` opens a code cell and ``# %% [markdown]`` a markdown cell whose lines are
    Markdown as is (``# Title`` is a heading, not a comment).
    """
    cells: list[tuple[str, list[str]]] = []
    for line in source.strip("\n").splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if line.strip() == "# %% [markdown]" else "code"
            if line.strip() not in ("# %%", "# %% [markdown]"):
                raise ValueError(f"cells_from_percent(source=...): expected '# %%' or "
                                 f"'# %% [markdown]', got {line!r}.")
            cells.append((kind, []))
        elif not cells:
            raise ValueError("cells_from_percent(source=...): expected the source to open with "
                             f"'# %%', got {line!r}.")
        else:
            cells[-1][1].append(line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build(name: str) -> nbformat.NotebookNode:
    """Return notebook ``name`` (a key of :data:`NOTEBOOKS`) with its cells and no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in cells_from_percent(NOTEBOOKS[name]):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(text))
    # Stable ids (not random ones) so regenerating an unchanged notebook changes no byte.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-cell-{i:02d}"
    nbformat.validate(nb)
    return nb


def execute(nb: nbformat.NotebookNode, cwd: str | os.PathLike, *,
            timeout: int = CELL_TIMEOUT_S) -> float:
    """Run every cell of ``nb`` in place in a fresh kernel of this interpreter; return seconds.

    The kernelspec lives in a temporary directory (no ``ipykernel install`` needed), the kernel
    starts in ``cwd`` with the repository root first on ``PYTHONPATH``. Raises
    ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) on the first error.
    """
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix="dattri_fn_kernel_") as prefix:
        install(kernel_name=KERNEL_NAME, prefix=prefix)
        specs = KernelSpecManager(kernel_dirs=[os.path.join(prefix, "share", "jupyter", "kernels")])
        km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([path] if path else []))}
        client = NotebookClient(nb, km=km, kernel_name=KERNEL_NAME, timeout=timeout,
                                record_timing=False, resources={"metadata": {"path": str(cwd)}})
        start = time.perf_counter()
        try:
            client.execute(env=env)
        finally:
            # nbclient shuts down only the kernels of managers it created itself.
            if km.has_kernel:
                km.shutdown_kernel(now=False)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="name prefixes, e.g. 01 03 (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write sources only")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if not names:
        parser.error(f"no notebook matches {args.only}; known: {list(NOTEBOOKS)}")
    for name in names:
        nb = build(name)
        if not args.no_execute:
            seconds = execute(nb, HERE)
            print(f"{name}: executed in {seconds:.1f} s", file=sys.stderr)
        nbformat.write(nb, HERE / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
