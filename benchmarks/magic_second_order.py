"""Tried and dropped (issue 20, stop 22): LayerNorm, softmax and cross-entropy whose double
backward is written by hand, differentiated in MAGIC's reverse step on text-lm.

    OMP_NUM_THREADS=1 python -m benchmarks.magic_second_order --rounds 6

Prints the largest difference of one reverse step (k = 16 targets, the recipe's Adam vjp_step)
through the hand-written layers from the step through torch's, in float64 (relative to the
largest value; ~1e-15) and float32, then thread CPU ms per reverse step, the two interleaved.
Measured medians 0.90-1.07x in four interleaved runs (noise on the shared machine): torch's own
second-order formulas cost about as many memory passes over the ``[k, B, T, *]`` cotangents as
these closed forms, so the library keeps nn.LayerNorm / softmax / F.cross_entropy (``benchmarks/RESULTS.md``).

The closed forms (``P`` the projection of one normalized row, last dim):

    LayerNorm   xhat = (x - mean x) r,   r = (var x + eps)^(-1/2),   y = w xhat + b
                gx = r P(w gy),   P(z) = z - mean(z) - xhat mean(z xhat)
                given cotangents (u, pw, pb) of (gx, gw, gb):
                  d/dgy = w P(r u) + xhat pw + pb,   d/dw = sum_rows gy P(r u)
                  d/dx  = r P(q) - r^2 <u, P(w gy)> xhat / D,
                  q = gy pw - r (mean(w gy xhat) u + mean(u xhat) w gy)
    softmax     gx = y (gy - <y, gy>);   d/dgy = y (u - <y, u>),   d/dy = u (gy - <y, gy>) - gy <u, y>
    cross-entr. l = logsumexp(x) - x_t;  gx = g (p - e_t);
                d/dg = <u, p - e_t>,   d/dx = p (g u - <p, g u>),   p = softmax(x)
"""


from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Return ``(xhat, r)`` of the last dim: ``(x - mean) r`` and ``r = (var + eps)^(-1/2)``."""
    centered = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    return centered * rstd, rstd


def _project(z: Tensor, xhat: Tensor) -> Tensor:
    """``P(z) = z - mean(z) - xhat mean(z xhat)`` per row (symmetric; ``r P`` is d xhat / dx)."""
    return z - z.mean(-1, keepdim=True) - xhat * (z * xhat).mean(-1, keepdim=True)


class _LayerNormBackward(Function):
    """``(gy, x, w) -> (gx, gw, gb)`` of LayerNorm over the last dim, with a hand-written vjp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gy, x, weight, eps):
        xhat, rstd = _normalize(x, eps)
        lead = tuple(range(gy.ndim - 1))
        return rstd * _project(gy * weight, xhat), (gy * xhat).sum(lead), gy.sum(lead)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, weight, eps = inputs
        ctx.save_for_backward(gy, x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, u, pw, pb):
        gy, x, weight = ctx.saved_tensors
        # Only u, pw, pb carry the targets' batch dim under vmap: xhat, r, a and P(a) are
        # computed once per call.
        xhat, rstd = _normalize(x, ctx.eps)
        a = gy * weight
        lead = tuple(range(gy.ndim - 1))
        p_ru = _project(rstd * u, xhat)
        g_gy = weight * p_ru + xhat * pw + pb
        g_w = (gy * p_ru).sum(lead)
        c_a = (a * xhat).mean(-1, keepdim=True)
        c_u = (u * xhat).mean(-1, keepdim=True)
        s_1 = (u * _project(a, xhat)).sum(-1, keepdim=True)
        q = gy * pw - rstd * (c_a * u + c_u * a)
        g_x = rstd * _project(q, xhat) - (rstd * rstd / x.shape[-1]) * s_1 * xhat
        return g_gy, g_x, g_w, None


class _LayerNorm(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        return (*_LayerNormBackward.apply(gy, x, weight, ctx.eps), None)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Return ``F.layer_norm(x, x.shape[-1:], weight, bias, eps)`` with a hand-written double
    backward (see the module docstring).  # [..., D], [D], [D] -> [..., D]"""
    return _LayerNorm.apply(x, weight, bias, eps)


class _SoftmaxBackward(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(gy, y):
        return y * (gy - (y * gy).sum(-1, keepdim=True))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, u):
        gy, y = ctx.saved_tensors
        r = (u * y).sum(-1, keepdim=True)
        return y * (u - r), u * (gy - (y * gy).sum(-1, keepdim=True)) - gy * r


class _Softmax(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.softmax(x, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        return _SoftmaxBackward.apply(gy, y)


def softmax(x: Tensor) -> Tensor:
    """Return ``x.softmax(-1)`` with a hand-written double backward.  # [..., C] -> [..., C]"""
    return _Softmax.apply(x)


class _CrossEntropyBackward(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(g, x, target):
        p = torch.softmax(x, -1)
        return g[..., None] * (p - F.one_hot(target, x.shape[-1]).to(p.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, u):
        g, x, target = ctx.saved_tensors
        p = torch.softmax(x, -1)
        g_g = (u * (p - F.one_hot(target, x.shape[-1]).to(p.dtype))).sum(-1)
        gu = g[..., None] * u
        return g_g, p * (gu - (p * gu).sum(-1, keepdim=True)), None


class _CrossEntropy(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, target):
        return torch.logsumexp(x, -1) - x.gather(-1, target[..., None]).squeeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, target = ctx.saved_tensors
        return _CrossEntropyBackward.apply(g, x, target), None


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Return each position's ``logsumexp(logits) - logits[target]`` (``F.cross_entropy`` with
    ``reduction="none"``, no ignored index) with a hand-written double backward.
    # [..., C], [...] int -> [...]"""
    return _CrossEntropy.apply(logits, target)


def lm_loss(output: Tensor, target: Tensor) -> Tensor:
    """Return the mean next-token cross-entropy over all tokens (the text-lm task's
    :func:`~dattri_fn.eval.tasks.lm_loss`) through :func:`cross_entropy`.  # [B, T, V], [B, T] -> []"""
    return cross_entropy(output, target).mean()


# One call for the batch's per-sequence losses (per_example_losses reads this attribute).
lm_loss.per_example = lambda output, target: cross_entropy(output, target).mean(-1)


class LayerNorm(nn.Module):
    """An ``nn.LayerNorm`` over its last dim (with weight and bias) computed by
    :func:`layer_norm`; the same parameter names and tensors."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        if not supported(norm):
            raise ValueError(f"LayerNorm(norm=...): expected an nn.LayerNorm over one dim with a "
                             f"weight and a bias and no forward hooks, got {norm}.")
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def supported(norm: nn.Module) -> bool:
    """Whether :class:`LayerNorm` computes what ``norm`` computes (no hooks: the swap drops them)."""
    return (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1
            and norm.weight is not None and norm.bias is not None
            and not norm._forward_hooks and not norm._forward_pre_hooks)


def _tiny_lm_forward(model, idx: Tensor) -> Tensor:
    """``TinyLM.forward`` with :func:`softmax` and the causal mask added as a constant 0 / -inf
    bias (the same values as ``masked_fill``; its backward is the identity, no masking pass)."""
    T = idx.shape[-1]
    h = model.tok(idx) + model.pos[:T]
    q, k, v = model.qkv(model.ln1(h)).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (model.heads, -1)).transpose(-2, -3) for t in (q, k, v))
    mask = model.causal.narrow(0, 0, T).narrow(1, 0, T)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    att = softmax((q @ k.transpose(-1, -2)) / model.scale + bias)
    h = h + model.proj((att @ v).transpose(-2, -3).flatten(-2))
    h = h + model.fc2(torch.relu(model.fc1(model.ln2(h))))
    return model.head(model.ln_f(h))


def with_second_order_layers(module: nn.Module) -> nn.Module:
    """Return a deep copy of ``module`` whose ``nn.LayerNorm`` submodules are :class:`LayerNorm`
    (and, for the text-lm task's ``TinyLM``, whose attention softmax is :func:`softmax`): the
    same parameter names and values, so the same params dict drives both.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
    """
    from dattri_fn.eval.tiny_lm import TinyLM

    if not isinstance(module, nn.Module):
        raise TypeError(f"with_second_order_layers(module=...): expected an nn.Module, "
                        f"got {type(module).__name__}.")
    out = copy.deepcopy(module)
    if supported(out):
        return LayerNorm(out)
    for name, sub in list(out.named_modules()):
        if name and supported(sub):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent), leaf, LayerNorm(sub))
    if type(out) is TinyLM:
        out.__class__ = _second_order_tiny_lm()
    return out


@functools.cache
def _second_order_tiny_lm() -> type:
    # Built on first use: the eval package imports the training package.
    from dattri_fn.eval.tiny_lm import TinyLM

    class SecondOrderTinyLM(TinyLM):
        """``TinyLM`` whose attention softmax has a hand-written double backward."""

        forward = _tiny_lm_forward

    return SecondOrderTinyLM


def main(argv=None) -> dict:
    import argparse
    import statistics
    import time

    from torch.func import grad, vjp, vmap

    from dattri_fn.attribute.metagradient import _join, _split
    from dattri_fn.eval.tasks import adam_run, get_task, task_step
    from dattri_fn.model import functional_model
    from dattri_fn.training import adam, cosine_schedule, make_step
    from dattri_fn.training.run import take

    p = argparse.ArgumentParser(prog="python -m benchmarks.magic_second_order")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = get_task("text-lm", n_train=128, n_test=16, seed=0)
    hp = task.hparams
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = task.make_model(0).to(dtype)
        fm = functional_model(model, task.loss_fn)
        opt, order = adam_run(task.n_train, epochs=hp["epochs"], lr=hp["lr"])
        same = adam(cosine_schedule(hp["lr"], hp["epochs"], recursive=True),
                    weight_decay=hp["weight_decay"])
        steps = {"torch": make_step(fm, same),
                 "hand": make_step(functional_model(with_second_order_layers(model), lm_loss), same)}
        data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
        state, ones = (fm.params, opt.init(fm.params)), torch.ones(128, dtype=dtype)
        run = task_step(fm, opt, hp["weight_decay"])
        for t in range(5):
            state = run(*state, take(data, order[t]), ones)
        cot = vmap(grad(lambda q, ex: -fm.loss(q, ex)), in_dims=(None, 0))(state[0], test)
        floats, how = _split(state)
        gen = torch.Generator().manual_seed(0)
        bar = list(cot.values()) + [1e-3 * torch.randn(16, *f.shape, generator=gen, dtype=dtype)
                                    for f in floats[len(cot):]]
        batch = take(data, order[5])

        def reverse(step, batch=batch, how=how, floats=floats, bar=bar, ones=ones):
            def one(floats_t, w_rows):
                q, o = _join(floats_t, how)
                return _split(step(q, o, batch, w_rows))[0]

            _, pullback = vjp(one, floats, ones)
            s_bar, w_bar = vmap(pullback)(bar)
            return torch.cat([x.reshape(-1) for x in s_bar] + [w_bar.reshape(-1)])

        a, b = reverse(steps["torch"]), reverse(steps["hand"])
        out[str(dtype)] = float((a - b).abs().max() / a.abs().max())
        print(f"{dtype}: max |hand - torch| / max |torch| = {out[str(dtype)]:.3g}")
    ms = {"torch": [], "hand": []}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.thread_time()
            reverse(step)
            ms[name].append((time.thread_time() - t0) * 1e3)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    ratios = [h / t for h, t in zip(ms["hand"], ms["torch"], strict=True)]
    for name, v in ms.items():
        print(f"{name}: ms per reverse step " + ", ".join(f"{x:.0f}" for x in v))
    print(f"hand / torch: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-"
          f"{max(ratios):.2f}; load {load}")
    return {"diff": out, "ms": ms}


if __name__ == "__main__":
    main()
