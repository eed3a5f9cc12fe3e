"""Thread CPU per MAGIC reverse step: the recipe's vjp_step with and without ReLU as a mask product.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_mask_relu --task digits-cnn --steps 6 --rounds 8
    OMP_NUM_THREADS=1 python -m benchmarks.magic_mask_relu --task text-lm --steps 3 --rounds 6

One run of the task (init seed 0, every state kept; the digits tasks under ``SGD_HPARAMS``, text-lm
under its own Adam), then ``metagradient(horizon=L)`` over the last ``L`` steps with the recipe's
chunk size, alternating within each round between two ``vjp_step`` forms: ``plain`` (digits-cnn:
the first conv as a GEMM; text-lm: the one-loss-path Adam step, both as the recipe had them before
:mod:`dattri_fn.training.mask_relu`) and ``mask`` (the same with every ReLU as
``x * 1[x > 0]``: the module swap on digits-cnn, the torch-function mode on text-lm). Prints ms
per step for each round, the medians, the median of the per-round ratios mask / plain, the largest
weight difference relative to the largest weight (0.0: bit for bit) and the machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_mask_relu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-cnn", choices=("digits-cnn", "text-lm"))
    p.add_argument("--steps", type=int, default=6, help="L: reverse steps per timed pass")
    p.add_argument("--rounds", type=int, default=8)
    return p.parse_args(argv)


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def setup(name: str):
    """Return ``(step, trajectory, data, order, cotangent, chunk, {form: vjp_step})``."""
    from torch.func import grad, vmap

    from dattri_fn.app.recipes import MAGIC_CHUNKS
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.tasks import SGD_HPARAMS, adam_run, get_task, sgd_run, task_step
    from dattri_fn.model import functional_model
    from dattri_fn.training import adam, cosine_schedule, make_step, train
    from dattri_fn.training.gemm_conv import with_gemm_convs
    from dattri_fn.training.mask_relu import mask_relu_step, with_mask_relus

    lm = name == "text-lm"
    task = get_task(name, n_train=128 if lm else 500, n_test=16 if lm else 50, seed=0,
                    hparams=None if lm else dict(SGD_HPARAMS))
    hp = task.hparams
    model = task.make_model(0)
    fm = functional_model(model, task.loss_fn)
    if lm:
        opt, order = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
        step = task_step(fm, opt, hp["weight_decay"])
        same = adam(cosine_schedule(hp["lr"], hp["epochs"], recursive=True),
                    weight_decay=hp["weight_decay"])
        plain = make_step(fm, same)
        forms = {"plain": plain, "mask": mask_relu_step(plain)}
        target = lambda p, ex: -fm.loss(p, ex)  # noqa: E731
    else:
        opt, order = sgd_run(task.n_train, seed=0, epochs=hp["epochs"], lr=hp["lr"],
                             weight_decay=hp.get("weight_decay", 0.0),
                             batch_size=hp["batch_size"], momentum=hp["momentum"])
        step = make_step(fm, opt)
        gemm = with_gemm_convs(model, ["0"])
        forms = {"plain": make_step(functional_model(gemm, task.loss_fn), opt),
                 "mask": make_step(functional_model(with_mask_relus(gemm), task.loss_fn), opt)}
        target = functional_model(model, classification_margin_loss).loss
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    traj = train(step, fm.params, opt.init(fm.params), data, order, checkpoint_every=1)
    cot = vmap(grad(target), in_dims=(None, 0))(traj.params, test)
    return step, traj, data, order, cot, MAGIC_CHUNKS.get(name), forms


def main(argv: Sequence[str] | None = None) -> dict:
    from dattri_fn.attribute.metagradient import metagradient

    args = parse_args(argv)
    torch.set_num_threads(1)
    step, traj, data, order, cot, chunk, forms = setup(args.task)
    L = min(args.steps, len(order))
    ms: dict[str, list[float]] = {k: [] for k in forms}
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, vjp_step in forms.items():
            t0 = time.thread_time()
            out[name] = metagradient(step, traj, data, order, cot, horizon=L, chunk_size=chunk,
                                     vjp_step=vjp_step).weights
            ms[name].append((time.thread_time() - t0) / L * 1e3)
    ref = out["plain"]
    row = {"task": args.task, "steps": L, "chunk": chunk,
           "ms": {k: [round(v, 1) for v in vs] for k, vs in ms.items()},
           "median_ms": {k: round(statistics.median(vs), 1) for k, vs in ms.items()},
           "paired_mask_over_plain": round(statistics.median(
               [m / p for m, p in zip(ms["mask"], ms["plain"], strict=True)]), 3),
           "max_rel_diff": float((out["mask"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)),
           "equal": bool(torch.equal(out["mask"], ref)), "load": load_avg()}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
