"""One rank of the 2-process gloo tests in tests/test_distributed.py (not collected by pytest).

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/_dist_worker.py
SCENARIO OUT. Scenario "all": CG on the all-reduced Hessian product, K-FAC/EK-FAC factors
(empirical, and true Fisher with seed 5), a
sharded Grad-Dot store and its scores (block and top-k); each rank saves its results to
OUT/rank{r}.pt. Scenario "die": both ranks build the sharded store, rank 1 exits after its
first shard; rank 0 writes the error its next collective raises (and how long it took) to
OUT/rank0.txt.
"""

import os
import sys
import time

import torch

from dattri_fn import distributed as D
from dattri_fn import io
from dattri_fn.attribute import grad_dot
from dattri_fn.losses import sample_categorical
from dattri_fn.operators.curvature import hvp
from dattri_fn.solve import ihvp_cg, kfac_factors
from dattri_fn.transforms.grad import per_sample_grad

CONFIG = {"method": "grad_dot", "proj_dim": None, "seed": 0}
DT = torch.float64


def problem():
    """Seeded tanh MLP (3-5-3, as an nn.Module and a per-example loss), 5 train batches of 6
    rows (uneven shards: 3 + 2 batches), 4 test rows, and a [3, P] right-hand side."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, example):
        x, y = example
        out = torch.func.functional_call(model, p, (x[None],))
        return torch.nn.functional.cross_entropy(out, y[None])

    train = [(torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
             for _ in range(5)]
    test = (torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))
    P = sum(v.numel() for v in params.values())
    V = torch.randn(3, P, generator=g, dtype=DT)
    return model, params, loss, train, test, V


def ce(out, y):
    return torch.nn.functional.cross_entropy(out, y)


# a user's own loss: fisher="true" draws its targets only from a sampler it names (RU2 H2)
ce.sample = sample_categorical


def run_all(out):
    rank, world = D.init(backend="gloo", timeout_s=30)
    model, params, loss, train, test, V = problem()
    local = D.shard_data(train)
    n_local = sum(b[0].shape[0] for b in local)
    res = {"X": ihvp_cg(D.all_reduce_linop(hvp(loss, params, local), n_local), damping=1.0,
                        rtol=1e-12)(V)}
    res["kfac"] = D.all_reduce_kfac(kfac_factors(model, ce, params, local))
    res["ekfac"] = D.ekfac_factors_sharded(model, ce, params, local)
    res["ekfac_true"] = D.ekfac_factors_sharded(model, ce, params, local, fisher="true", seed=5)
    store = D.sharded_store(os.path.join(out, "store"), lambda b: per_sample_grad(loss, params, b),
                            local, params=params, config=CONFIG)
    part, offset = D.local_part(store)
    m = grad_dot(loss)
    res["block"], res["offset"] = m.score(params, (), part, test), offset
    res["top"] = D.gather_topk(m.score(params, (), part, test, top_k=4), offset, k=4)
    io.save(res, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def run_die(out):
    rank, _ = D.init(backend="gloo", timeout_s=20)
    _, params, loss, train, _, _ = problem()
    calls = []

    def features(batch):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os._exit(3)  # dies mid-build: its first shard committed, the second not
        return per_sample_grad(loss, params, batch)

    t0 = time.perf_counter()
    try:
        D.sharded_store(os.path.join(out, "store"), features, D.shard_data(train), params=params,
                        config=CONFIG)
    except RuntimeError as err:
        with open(os.path.join(out, "rank0.txt"), "w") as f:
            f.write(f"{time.perf_counter() - t0:.2f}\n{err}")
        os._exit(0)
    os._exit(4)


if __name__ == "__main__":
    torch.set_num_threads(1)  # set here, not at import: the test module imports problem() from this file
    {"all": run_all, "die": run_die}[sys.argv[1]](sys.argv[2])
