"""text-lm's bare ``pos`` captured as rows (stop 23) against ``vmap(grad)`` for it, in one process.

Grad-Dot as the recipe configures it (``recipe("grad-dot", task, [model], batch_size=16)``)
and TRAK on the task's FunctionalModel (``trak(functional_model(model, task.loss_fn),
proj_dim=16)``: the text-lm recipe gives TRAK a plain loss, which takes no plan), on the
recipe's batches of the ``text-lm`` task's untrained ``TinyLM`` (``make_model(0)``), one
prepare + score per round, the two arms alternated: ``rows`` (the plan captures ``pos``:
``LayerPlan.bare``) and ``vmap`` (the plan built without bare candidates, as before: ``pos``
takes ``vmap(grad)``, which runs the whole model vmapped over examples). Median thread CPU
time, the exact tensor peak (``benchmarks.peak.tensor_peak``) and the largest relative score
difference. Run: ``OMP_NUM_THREADS=1 nice -n 15 python -m benchmarks.bare_rows_ab``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

from benchmarks.peak import tensor_peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-test", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--methods", default="grad-dot,trak")
    a = p.parse_args(argv)
    from dattri_fn.app.recipes import recipe
    from dattri_fn.attribute.trak import trak
    from dattri_fn.eval.tasks import get_task
    from dattri_fn.model import functional_model
    from dattri_fn.transforms import layer_grads_plan as lp

    task = get_task("text-lm", n_train=a.n_train, n_test=a.n_test, seed=0)
    model = task.make_model(0).eval()
    real = lp.attributed_layers

    def without_bare(module, params):
        from dattri_fn.transforms.capture import layer_specs

        specs = layer_specs(module, norms=True, bare=True)
        return [n for n in real(module, params) if specs[n].kind != "bare"]

    arms = {"rows": real, "vmap": without_bare}
    gd = recipe("grad-dot", task, [model], batch_size=16, proj_dim=16)

    def make(name):
        if name == "grad-dot":
            return recipe(name, task, [model], batch_size=16, proj_dim=16)
        # the text-lm recipe gives TRAK a plain loss (no plan, every parameter by vmap(grad)):
        # TRAK on the task's FunctionalModel, with the recipe's data, takes the plan
        fm = functional_model(model, task.loss_fn)
        return gd._replace(method=trak(fm, proj_dim=16), params=fm.params)
    out = {}
    for name in a.methods.split(","):
        built = {}
        for arm, fn in arms.items():  # a method's plan is made when the method is built
            lp.attributed_layers = fn
            try:
                built[arm] = make(name)
            finally:
                lp.attributed_layers = real
        times = {k: [] for k in arms}
        peaks, scores = {}, {}
        for i in range(a.rounds + 1):
            for arm, fn in (arms.items() if i % 2 == 0 else reversed(arms.items())):
                lp.attributed_layers, r = fn, built[arm]
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = time.thread_time()
                        S = r.method.score(r.params, r.method.prepare(r.params, r.train),
                                           r.train, r.test)
                        dt = time.thread_time() - t0
                        if i == 0:  # the first round warms up; its peak is measured
                            scores[arm] = S
                            peaks[arm] = tensor_peak(lambda: r.method.score(
                                r.params, r.method.prepare(r.params, r.train), r.train, r.test))[1]
                        else:
                            times[arm].append(dt)
                finally:
                    lp.attributed_layers = real
        rel = float((scores["rows"] - scores["vmap"]).abs().max() / scores["vmap"].abs().max())
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        out[name] = dict(ms=med, peak_mib={k: v / 2**20 for k, v in peaks.items()}, rel=rel)
        print(f"{name:9s} CPU ms vmap -> rows: {med['vmap']:.1f} -> {med['rows']:.1f} "
              f"({med['rows'] / med['vmap']:.2f}x); tensor peak MiB {peaks['vmap'] / 2**20:.2f} -> "
              f"{peaks['rows'] / 2**20:.2f}; max rel. score difference {rel:.1e}")
    with open("/proc/loadavg") as f:
        print("load:", f.read().strip())
    return out


if __name__ == "__main__":
    main()
