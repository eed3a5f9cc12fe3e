"""Scores of every recipe method on small bundled tasks, saved before the capture-engine redesign.

``python -m tests.reference_scores`` rewrites ``tests/data/reference_scores.pt`` (run it only on a
commit whose scores are the reference); ``tests/test_reference_scores.py`` recomputes and compares.
"""

from __future__ import annotations

import warnings

import torch

from dattri_fn.app.recipes import METHODS, recipe
from dattri_fn.attribute import grad_cos, grad_dot, influence, tracin
from dattri_fn.eval.tasks import get_task, train_model
from dattri_fn.model import functional_model

TASKS = {"digits-lr": (40, 4), "digits-mlp": (40, 4), "digits-cnn": (24, 3), "text-lm": (12, 3)}
PATH = "tests/data/reference_scores.pt"


# Recipes added after the reference was saved (their own tests check them; MAGIC also needs a
# task trained by sgd/adam steps, and digits-lr trains by L-BFGS).
LATER = {"magic", "magic-ens", "if-cg-ens", "tracin-cos", "knn-shapley"}


def methods_for(task_name: str) -> tuple[str, ...]:
    """Recipe names run on ``task_name`` (K-FAC needs Linear layers; RPS a linear head)."""
    skip = {"text-lm": {"rps", "if-explicit", "if-lissa", "if-arnoldi"},
            "digits-cnn": {"if-explicit", "if-lissa"}}.get(task_name, set())
    return tuple(m for m in METHODS if m not in skip | LATER)


def user_methods(fm):
    """Each method as a user writes it from the README, with only the settings one must choose."""
    return {"user-grad-dot": (grad_dot(fm), fm.params),
            "user-grad-cos": (grad_cos(fm), fm.params),
            "user-tracin": (tracin(fm, lrs=[0.1]), [fm.params]),
            "user-if-ekfac": (influence(fm, solver="ekfac", damping=0.1), fm.params),
            # the default curvature when these were saved (now: the Gauss-Newton)
            "user-if-cg": (influence(fm, solver="cg", damping=0.1, max_iter=20,
                                     curvature="hessian"), fm.params)}


def compute(task_name: str) -> dict[str, torch.Tensor]:
    """Return ``{method: [n_train, n_test] scores}`` for ``task_name`` at its TASKS sizes."""
    n_train, n_test = TASKS[task_name]
    task = get_task(task_name, n_train=n_train, n_test=n_test, seed=3,
                    hparams={"epochs": 2} if task_name != "digits-lr" else None)
    models = [train_model(task, seed=s) for s in range(2)]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in methods_for(task_name):
            r = recipe(name, task, models, batch_size=16, proj_dim=16, max_iter=20,
                       arnoldi_rank=8, arnoldi_block=4)
            state = r.method.prepare(r.params, r.train)
            out[name] = r.method.score(r.params, state, r.train, r.test).detach().double()
        fm = functional_model(models[0].eval(), task.loss_fn)
        train = [(task.x_train[i:i + 16], task.y_train[i:i + 16]) for i in range(0, n_train, 16)]
        test = (task.x_test, task.y_test)
        for name, (m, params) in user_methods(fm).items():
            if name == "user-if-ekfac" and task_name != "digits-mlp":
                continue  # a bare Linear, a CNN, a transformer: K-FAC refused before this redesign
            if name == "user-if-cg" and task_name == "text-lm":
                continue
            state = m.prepare(params, train)
            out[name] = m.score(params, state, train, test).detach().double()
    return out


def main() -> None:
    torch.manual_seed(0)
    torch.save({t: compute(t) for t in TASKS}, PATH)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
