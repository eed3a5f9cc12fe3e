"""What a straight-line FactGraSS round would cost on a bundled task: the library's own sketches,
``mlp_io``, masks, stage-1/2 blocks, grams, inverse and products, in the same order and sizes, for
the certified plain MLP with cached features, without the stream machinery (``_Rows``, ``pieces``,
``collect``), the plan and state checks and the data-layout checks; the finite checks of the
params, the inputs, the test features and the Fisher kept as plain ``all_finite`` calls.

    OMP_NUM_THREADS=1 python -m benchmarks.factgrass_straight [digits-mlp|digits-lr] [rounds]

Printed: whether its scores equal the library's (``torch.equal``), and the median thread CPU of
both rounds, interleaved, with the median of the per-round ratios. A measurement of the floor a
dedicated fast path could reach (issue 18, stop 28), not a method.
"""
import importlib
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")
import torch  # noqa: E402

torch.set_num_threads(1)
from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM  # noqa: E402
from benchmarks.run import BENCH_HP, runner_for, task_and_models  # noqa: E402
from dattri_fn._checks import all_finite  # noqa: E402
from dattri_fn.app.recipes import recipe  # noqa: E402
from dattri_fn.model import functional_model  # noqa: E402
from dattri_fn.transforms.layer_grads import layer_plan  # noqa: E402
from dattri_fn.transforms.mlp_io import mlp_io  # noqa: E402

fg = importlib.import_module("dattri_fn.attribute.factgrass")
fisher = importlib.import_module("dattri_fn.attribute.factgrass_fisher")
name = sys.argv[1] if len(sys.argv) > 1 else "digits-mlp"
task, models = task_and_models(name, 1)
lib = runner_for("ours", "factgrass", task, models, BENCH_HP)
fm = functional_model(models[0].eval(), task.loss_fn)
r = recipe("grad-dot", task, models[:1], batch_size=BENCH_HP["batch_size"])
plan = layer_plan(fm)
k1 = max(1, round((FACTGRASS_BLOWUP * FACTGRASS_DIM) ** 0.5))
sk = fg._draw(plan, fm.params, k1, FACTGRASS_DIM, "sjlt", 0)
blocks = fg._blocks_of(sk)
W = blocks[-1][2]
layers = tuple(plan.layers)
state = {**fm.fixed, **fm.params}
ones = {n: plan.layers[n][1] is not None for n in layers}
SB = fg._SKETCH_BYTES

def feats(x, y, out):
    io = mlp_io(fm.module, fm.loss_fn, state, (x,), {}, y, layers)
    n = x.shape[0]
    for blk, s, e in blocks:
        a, g = io.pop(blk)
        pa, pg = sk.stage1.project_sides(blk, a, g, ones=ones[blk])
        M = sk.dense[blk]
        w = pa.shape[1] * pg.shape[1]
        step = max(1, min(n, SB // (w * 4)))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            S = (pg[r0:r1, :, None] * pa[r0:r1, None, :]).view(r1 - r0, -1)
            torch.mm(S, M, out=out[r0:r1, s:e])
    return out

def prepare():
    for p in fm.params.values():
        assert all_finite(p)
    x, y = torch.cat([b[0] for b in r.train]), torch.cat([b[1] for b in r.train])
    assert all_finite(x)
    n = x.shape[0]
    buf = x.new_empty(n, W)
    feats(x, y, buf)
    G = fisher._group_gram(buf, 0, W, 64, blocks, tuple(b for b, _, _ in blocks))
    A = G / n
    d = A.diagonal(dim1=-2, dim2=-1)
    d.add_(0.1 * d.mean(-1, keepdim=True))
    assert all_finite(A)
    L, info = torch.linalg.cholesky_ex(A)
    assert not any(info.tolist())
    return buf, dict(zip([b for b, _, _ in blocks], torch.cholesky_inverse(L).unbind(),
                    strict=True))

def score(st):
    buf, inv = st
    for p in fm.params.values():
        assert all_finite(p)
    x, y = r.test
    assert all_finite(x)
    t = feats(x, y, x.new_empty(x.shape[0], W))
    assert all_finite(t)
    pre = torch.empty_like(t)
    for blk, s, e in blocks:
        torch.mm(t[:, s:e], inv[blk], out=pre[:, s:e])
    return buf @ pre.T

ref = lib.score(lib.prepare())
got = score(prepare())
print("scores: max diff / max|S|", float((got - ref).abs().max() / ref.abs().max()),
      "equal", torch.equal(got, ref))
for _ in range(10):
    lib.score(lib.prepare())
    score(prepare())
def once(f):
    c = time.thread_time()
    f()
    return time.thread_time() - c



a, b = [], []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 100):
    a.append(once(lambda: lib.score(lib.prepare())))
    b.append(once(lambda: score(prepare())))
ratio = statistics.median([y / x for x, y in zip(a, b, strict=True)])
print(f"{name}: library {statistics.median(a) * 1e3:.2f} ms, straight-line "
      f"{statistics.median(b) * 1e3:.2f} ms, ratio {ratio:.3f} (load {os.getloadavg()[0]:.2f})")
