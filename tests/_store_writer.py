"""Subprocess helper for tests/test_store.py: build a Grad-Dot store, SIGKILLed at random moments.

Usage: python tests/_store_writer.py ROOT SEED KILLS [MODE]. Imports once, then forks writers (no
re-import per run): one uninterrupted build into ROOT/ref (timed), then KILLS builds into
ROOT/killed, each SIGKILLed after a delay drawn from Random(SEED) within 12% of the
uninterrupted time, then one build that finishes. Prints one JSON line: the signal each writer
died of (0 = finished) and the shards committed after each kill.

MODE "store" (default) builds one store of the 48 batches; MODE "record" runs 48 SGD steps
recorded with per-step gradient stores in append mode (``GradSpec(steps_per_shard=4)``), each
run of the loop resuming the groups a killed one committed; "committed" then counts groups.
"""

import json
import os
import random
import shutil
import signal
import sys
import time

import torch

torch.set_num_threads(1)  # one BLAS schedule in every writer

from dattri_fn.store import build_store  # noqa: E402
from dattri_fn.training import GradSpec, finish_record, record_step, start_record  # noqa: E402
from dattri_fn.transforms.grad import per_sample_grad  # noqa: E402

N_SHARDS, ROWS, DIM, HIDDEN, CLASSES = 48, 16, 20, 64, 10


def problem():
    """A 20-64-10 tanh MLP (P = 2058) and 48 batches of 16 rows, all from Generator(0)."""
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    params = {"w1": torch.randn(HIDDEN, DIM, generator=g, dtype=dt) / DIM**0.5,
              "b1": torch.zeros(HIDDEN, dtype=dt),
              "w2": torch.randn(CLASSES, HIDDEN, generator=g, dtype=dt) / HIDDEN**0.5,
              "b2": torch.zeros(CLASSES, dtype=dt)}

    def loss(p, example):
        x, y = example
        h = torch.tanh(p["w1"] @ x + p["b1"])
        return torch.nn.functional.cross_entropy((p["w2"] @ h + p["b2"])[None], y[None])

    data = [(torch.randn(ROWS, DIM, generator=g, dtype=dt),
             torch.randint(0, CLASSES, (ROWS,), generator=g)) for _ in range(N_SHARDS)]
    return params, loss, data


def write(path):
    params, loss, data = problem()
    build_store(path, lambda batch: per_sample_grad(loss, params, batch), data, params=params,
                config={"method": "grad_dot", "proj_dim": None, "seed": 0})


def write_record(path):
    params, loss, data = problem()
    rec = start_record("sgd", grads=GradSpec(loss, path, steps_per_shard=STEPS_PER_SHARD))
    mean_loss = lambda p, batch: torch.vmap(loss, in_dims=(None, 0))(p, batch).mean()
    for t, batch in enumerate(data if not path.endswith("warm") else data[:2]):
        rec = record_step(rec, torch.arange(t * ROWS, (t + 1) * ROWS), lr=0.1, params=params,
                          batch=batch)
        g = torch.func.grad(mean_loss)(params, batch)
        params = {k: v - 0.1 * g[k] for k, v in params.items()}
    finish_record(rec, params=params)


STEPS_PER_SHARD = 4
MODE = sys.argv[4] if __name__ == "__main__" and len(sys.argv) > 4 else "store"


def fork_writer(path) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            (write_record if MODE == "record" else write)(path)
        except BaseException:
            os._exit(1)
        os._exit(0)
    return pid


def died_of(pid) -> int:
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def committed(path) -> int:
    if MODE == "record":
        return sum(os.path.exists(os.path.join(path, d, "manifest.json"))
                   for d in (os.listdir(path) if os.path.isdir(path) else []))
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return len(json.load(f)["shards"])
    except FileNotFoundError:
        return 0


if __name__ == "__main__":
    root, seed, kills = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if MODE == "record":  # first calls (vmap, grad) warmed here, not in every forked writer
        write_record(os.path.join(root, "warm"))
        shutil.rmtree(os.path.join(root, "warm"))
    rng = random.Random(seed)
    t0 = time.perf_counter()
    signals = [died_of(fork_writer(os.path.join(root, "ref")))]
    work = time.perf_counter() - t0
    killed, progress = os.path.join(root, "killed"), []
    for _ in range(kills):
        pid = fork_writer(killed)
        time.sleep(rng.uniform(0.0, 0.12 * work))
        os.kill(pid, signal.SIGKILL)
        signals.append(died_of(pid))
        progress.append(committed(killed))
    signals.append(died_of(fork_writer(killed)))
    print(json.dumps({"signals": signals, "committed": progress, "work_s": work}), flush=True)
