"""Per-call time of the capture engine's users: LoGra, FactGraSS and Grad-Dot on a bundled task.

    OMP_NUM_THREADS=1 python -m benchmarks.capture_overhead [--task digits-mlp] [--repeats 20]
    OMP_NUM_THREADS=1 python -m benchmarks.capture_overhead --gpt2 [--profile]

Times (median thread CPU time of ``--repeats`` warm calls, one process): ``prepare`` + ``score`` as
``benchmarks.run`` calls them (same sizes), one ``batched_io`` pass of the capture engine on a
256-row batch, and the bare forward + backward of the same batch without the engine (the floor
the engine's overhead sits on). ``--gpt2``: a tiny GPT-2 (2 layers, width 64, 16 x 32
tokens; its Conv1D layers).
``--profile``: a cProfile of the engine's batched pass (top 25 by cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    """Median CPU time of this thread per call (ms): less sensitive than wall time to other
    jobs on shared cores (time waiting for a core is not counted)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return 1e3 * statistics.median(times)


def _engine_calls(fm, batch, kinds=("linear", "conv1d", "conv2d", "embedding")):
    """Return (engine pass, bare forward+backward) closures on one batch (layers of ``kinds``)."""
    from dattri_fn.transforms import capture
    from dattri_fn.transforms.layers import batched_io, output_shapes, unpack_example

    names = [n for n, s in capture.layer_specs(fm.module).items()
             if s.weight in fm.params and s.kind in kinds]
    tapped = capture.tap(fm.module, names)
    state = {**fm.fixed, **fm.params}
    args, kwargs, target = unpack_example(batch)
    like = next(iter(fm.params.values()))
    shapes = output_shapes(tapped, state, args, kwargs, like)

    def engine():
        return batched_io(tapped, fm.loss_fn, state, args, kwargs, target, shapes, like)

    def bare():
        live = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
        with torch.enable_grad():
            out = torch.func.functional_call(fm.module, {**fm.fixed, **live}, args, kwargs)
            loss = fm.loss_fn(out, target) if target is not None else fm.loss_fn(out)
            return torch.autograd.grad(loss, list(live.values()))

    return engine, bare


def digits(task_name: str, repeats: int, profile: bool) -> None:
    from benchmarks.against_dattri import FACTGRASS_BLOWUP, FACTGRASS_DIM, LOGRA_K
    from dattri_fn.app.recipes import recipe
    from dattri_fn.attribute.factgrass import factgrass
    from dattri_fn.attribute.gradsim import grad_dot
    from dattri_fn.attribute.logra import logra
    from dattri_fn.eval.tasks import get_task, train_model
    from dattri_fn.model import functional_model

    task = get_task(task_name, n_train=500, n_test=50, seed=0)
    model = train_model(task, seed=0).eval()
    fm = functional_model(model, task.loss_fn)
    r = recipe("grad-dot", task, [model], batch_size=256)
    methods = {"logra": logra(fm, proj_dim=LOGRA_K),
               "factgrass": factgrass(fm, proj_dim=FACTGRASS_DIM, blowup=FACTGRASS_BLOWUP),
               "grad-dot": grad_dot(fm)}
    print(f"{task_name}: n_train=500 n_test=50, median CPU ms of {repeats} warm calls")
    for name, m in methods.items():
        state = m.prepare(fm.params, r.train)
        prep = _median_ms(lambda m=m: m.prepare(fm.params, r.train), repeats)
        score = _median_ms(lambda m=m, s=state: m.score(fm.params, s, r.train, r.test), repeats)
        print(f"  {name:10s} prepare {prep:7.2f}  score {score:7.2f}  total {prep + score:7.2f}")
    batch = (task.x_train[:256], task.y_train[:256])
    engine, bare = _engine_calls(fm, batch)
    print(f"  engine batched_io [256]  {_median_ms(engine, repeats):7.3f}")
    print(f"  bare fwd+bwd      [256]  {_median_ms(bare, repeats):7.3f}")
    if profile:
        _profile(engine)


def gpt2(repeats: int, profile: bool) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from dattri_fn.model import functional_model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    model = GPT2LMHeadModel(cfg).eval()

    def loss_fn(out, target):
        logits = out.logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target[:, 1:].reshape(-1))

    fm = functional_model(model, loss_fn)
    x = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    engine, bare = _engine_calls(fm, (x, x), kinds=("conv1d",))
    print(f"gpt2 tiny (2 layers, width 64), 16 x 32 tokens, median CPU ms of {repeats} warm calls")
    print(f"  engine batched_io  {_median_ms(engine, repeats):7.3f}")
    print(f"  bare fwd+bwd       {_median_ms(bare, repeats):7.3f}")
    if profile:
        _profile(engine)


def _profile(fn) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capture_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--gpt2", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.gpt2:
        gpt2(args.repeats, args.profile)
    else:
        digits(args.task, args.repeats, args.profile)


if __name__ == "__main__":
    main()
