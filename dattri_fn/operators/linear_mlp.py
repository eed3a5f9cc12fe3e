"""The exact Hessian of a softmax cross-entropy MLP, by Pearlmutter's R-operator in GEMMs.

For ``nn.Sequential(Linear, act, Linear, act, ..., Linear)`` with elementwise activations
``act`` in :data:`ACTIVATIONS` and the loss ``F.cross_entropy`` on integer labels, the product
``H v`` of one example's loss Hessian with ``v = (V_W, V_b)`` per layer is (``z_l = W_l a_{l-1}
+ b_l``, ``a_l = s(z_l)``, ``delta_l = dl/dz_l``, ``e_{l-1} = W_l^T delta_l``):

    forward    R z_l = V_W_l a_{l-1} + V_b_l + W_l R a_{l-1},      R a_l = s'(z_l) R z_l
    output     R delta_L = p * R z_L - p (p . R z_L),               p = softmax(z_L)
    backward   R e_{l-1} = V_W_l^T delta_l + W_l^T R delta_l
               R delta_{l-1} = s''(z_{l-1}) e_{l-1} R z_{l-1} + s'(z_{l-1}) R e_{l-1}
    product    (H v)_{W_l} = R delta_l a_{l-1}^T + delta_l (R a_{l-1})^T,  (H v)_{b_l} = R delta_l

(Pearlmutter 1994, "Fast exact multiplication by the Hessian"). Every example's ``a``, ``s'``,
``s'' e``, ``delta`` and ``p`` are computed once and kept (within the memory budget), so a product
on ``k`` rows is a few GEMMs of ``[k x B, width]`` per layer, where autodiff's batched double
backward re-runs the forward and backward and batches ``k`` small products (on the digits MLP,
64 examples, 50 rows: ~1.5 against ~5.3 ms on one CPU thread).

:func:`mlp_hessian` returns the operator only where it is the Hessian: the structure above (the
params exactly the Linear layers' weights and biases, in any order; the module and its layers of
exactly those types, without hooks; float32 or float64), int64 labels in ``[0, C)``, and its
product on up to 64 examples spread over the data equal to autodiff's Hessian-vector product
through the module (within ``1e3 eps``); anything else returns None and the caller keeps its
autodiff product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp

from .._checks import batch_cat, batch_size, is_batch
from .._types import LinOp, Params
from ..module_call import call_module

__all__ = ["ACTIVATIONS", "MLPHessian", "mlp_hessian"]

_CHECK_ROWS = 64  # examples (spread over the data) the product is checked on against autodiff
# max |ours - float64 autodiff| / max |autodiff| the check accepts: 1e3 eps (a correct float32
# product measured 1.4e-7 to 2.5e-7 on random MLPs up to 784-256-10, 1.9e-6 on the trained
# digits MLP; 1e-3 off is refused). Half dtypes: None, since their eps (bfloat16 7.8e-3) cannot
# tell a dropped activation from rounding.
_CHECK_TOL = {torch.float32: 1e3 * torch.finfo(torch.float32).eps,
              torch.float64: 1e3 * torch.finfo(torch.float64).eps}


def _tanh(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a = torch.tanh(z)
    d1 = 1 - a * a
    return a, d1, -2 * a * d1


def _sigmoid(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a = torch.sigmoid(z)
    d1 = a * (1 - a)
    return a, d1, d1 * (1 - 2 * a)


def _relu(z: Tensor) -> tuple[Tensor, Tensor, None]:
    return torch.relu(z), (z > 0).to(z.dtype), None  # s'' = 0 (almost everywhere, as autograd)


def _identity(z: Tensor) -> tuple[Tensor, None, None]:
    return z, None, None


# activation -> z -> (s(z), s'(z) or None for 1, s''(z) or None for 0)
ACTIVATIONS: dict[type, Callable] = {nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.ReLU: _relu,
                                     nn.Identity: _identity}


class MLPHessian(LinOp):
    """``V -> H V`` of :func:`mlp_hessian` (the mean over the data's examples), with
    ``on_rows(idx)``: the same over the examples ``idx`` of the data in order (LiSSA's
    mini-batches).  # [k, P] -> [k, P]"""

    __slots__ = ("_rows",)

    def on_rows(self, idx: Tensor) -> LinOp:
        return self._rows(idx)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _plain(m: nn.Module) -> bool:
    """No hook of its own and no ``forward`` set on the instance: its class's forward is what runs.

    Global module hooks are not refused: observers register them (FlopCounterMode's module
    tracker, profilers) and return None; one that changed values would show in the autodiff
    check."""
    return "forward" not in vars(m) and not any(getattr(m, h, None) for h in _HOOKS)


def _chain(module: nn.Module, params: Params):
    """``[(weight key, bias key or None, activation fn or None)]`` of a supported MLP, else None.

    ``nn.Sequential.forward`` runs ``_modules.values()``, where one module object may appear
    under several names (``relu = nn.ReLU(); Sequential(l1, relu, l2, relu, l3)``), so that is
    the walk (``named_children`` lists a shared object once). Exact types only: a subclass may
    have its own forward. A stateless activation may repeat; a Linear object, weight or bias
    seen twice gives None (its two uses are one parameter, which the product keys once)."""
    if type(module) is not nn.Sequential or not _plain(module):
        return None
    layers, keys, seen = [], set(), set()
    for name, child in module._modules.items():
        if child is None or not _plain(child):
            return None
        if type(child) is nn.Linear:
            w, b = f"{name}.weight", f"{name}.bias" if child.bias is not None else None
            if w not in params or (b is not None and b not in params):
                return None
            ids = {id(child), id(child.weight)} | ({id(child.bias)} if b else set())
            if ids & seen:  # a Linear (or its weight) used twice: one parameter, two uses
                return None
            seen |= ids
            if layers and layers[-1][2] is None:  # two Linear layers in a row
                layers[-1] = (*layers[-1][:2], _identity)
            layers.append((w, b, None))
            keys |= {w} | ({b} if b else set())
        elif type(child) in ACTIVATIONS and layers and layers[-1][2] is None:
            layers[-1] = (*layers[-1][:2], ACTIVATIONS[type(child)])
        else:
            return None
    if not layers or layers[-1][2] is not None or set(params) != keys:
        return None  # the output must be the last Linear's, and every param one of theirs
    return layers


def _factors(layers, params: Params, x: Tensor, y: Tensor) -> dict:
    """What every product reuses for the examples ``x``, ``y``: inputs ``a``, ``s'``,
    ``s'' e``, ``delta`` per layer (the output's softmax folded into ``p``)."""
    a, ins, d1s, cs = x, [], [], []
    for w, b, act in layers:
        ins.append(a)
        z = F.linear(a, params[w], None if b is None else params[b])
        if act is None:
            break
        a, d1, _ = act(z)
        d1s.append(d1)
        cs.append(z)  # replaced by s''(z) e below, once e is known
    p = torch.softmax(z, dim=-1)
    delta = p.clone()
    delta[torch.arange(p.shape[0], device=p.device), y] -= 1
    deltas = [None] * len(layers)
    deltas[-1] = delta
    for i in range(len(layers) - 1, 0, -1):
        e = delta @ params[layers[i][0]]  # dl/da_{i-1}  # [B, in_i]
        _, d1, d2 = layers[i - 1][2](cs[i - 1])
        cs[i - 1] = None if d2 is None else d2 * e
        delta = e if d1 is None else d1 * e
        deltas[i - 1] = delta
    return {"a": ins, "d1": d1s, "c": cs, "delta": deltas, "p": p}


def _product(layers, params: Params, f: dict, V: dict[str, Tensor]) -> dict[str, Tensor]:
    """Summed over ``f``'s examples: ``{key: (sum_i H_i v)[key]}`` per row of ``V``
    (``{key: [k, *shape]}``).

    The R-quantities are laid out ``[B, k, width]``, so every product is one 2-d GEMM over
    ``B x k`` rows (or over the ``k x width`` columns) and every elementwise factor of an
    example broadcasts over its ``k`` rows."""
    L = len(layers)
    k = next(iter(V.values())).shape[0]
    B = f["p"].shape[0]
    rz, ra = [], [None]  # R z_l, R a_l  # [B, k, width] (R a_0 = 0)
    for i, (w, b, _) in enumerate(layers):
        vw = V[w]  # [k, out, in]
        out_w, in_w = vw.shape[1:]
        vt = vw.reshape(k * out_w, in_w).T
        # the bias rows and W R a accumulate into the GEMM's own output: no extra passes
        r = f["a"][i] @ vt if b is None else torch.addmm(V[b].reshape(-1), f["a"][i], vt)
        if ra[i] is not None:
            r.view(B * k, out_w).addmm_(ra[i].view(B * k, in_w), params[w].T)
        r = r.view(B, k, out_w)
        rz.append(r)
        if i < L - 1:
            d1 = f["d1"][i]
            ra.append(r if d1 is None else d1[:, None] * r)
    p = f["p"][:, None]
    rd = p * rz[-1] - p * (p * rz[-1]).sum(-1, keepdim=True)  # R delta_L  # [B, k, C]
    out = {}
    for i in range(L - 1, -1, -1):
        w, b, _ = layers[i]
        vw = V[w]
        out_w, in_w = vw.shape[1:]
        delta = f["delta"][i]  # [B, out]
        gw = (rd.reshape(B, k * out_w).T @ f["a"][i]).view(k, out_w, in_w)
        if ra[i] is not None:
            gw = gw + (delta.T @ ra[i].reshape(B, k * in_w)).view(out_w, k, in_w).transpose(0, 1)
        out[w] = gw
        if b is not None:
            out[b] = rd.sum(0)
        if i == 0:
            break
        re = rd.reshape(B * k, out_w) @ params[w]  # R e_{i-1}  # [B k, in]
        re.view(B, k * in_w).addmm_(delta, vw.transpose(0, 1).reshape(out_w, k * in_w))
        re = re.view(B, k, in_w)  # a new tensor: scaled in place below
        d1, c = f["d1"][i - 1], f["c"][i - 1]
        rd = re if d1 is None else re.mul_(d1[:, None])
        if c is not None:
            rd = rd.addcmul_(c[:, None], rz[i - 1])
    return out


def mlp_hessian(module: nn.Module, loss_fn: Callable, params: Params, data, *,
                batch_rows: int | None = None, memory: int | None = None) -> MLPHessian | None:
    """Return ``V -> H V`` with ``H`` the Hessian of the mean loss of a softmax cross-entropy
    MLP (module docstring), from kept per-example factors; else None.  # [k, P] -> [k, P]

    Args:
        module: the model (``nn.Sequential`` of ``nn.Linear`` and :data:`ACTIVATIONS`, exact
            types, no forward hooks; a stateless activation object may be reused).
        loss_fn: ``F.cross_entropy`` (anything else gives None).
        params: exactly the Linear layers' weights and biases; their order is the ravel order.
        data: one Batch ``(x [B, in], y [B] int64)`` or a list/tuple of them, in order.
        batch_rows: examples per product step (memory ``k x batch_rows x width``); None: 64.
        memory: bytes the factors may keep (:func:`~dattri_fn.operators.memory_budget`'s
            default when None); more gives None.

    Returns:
        An :class:`MLPHessian` (``on_rows(idx)`` gives the mean over examples ``idx``), or
        None where the structure, the data or the autodiff check does not hold.
    """
    from .gauss_newton import _is_softmax_cross_entropy, memory_budget

    if not _is_softmax_cross_entropy(loss_fn):
        return None
    layers = _chain(module, params)
    if layers is None:
        return None
    if is_batch(data):
        data = [data]
    if not (isinstance(data, (list, tuple)) and data and all(
            is_batch(b) and isinstance(b, (tuple, list)) and len(b) == 2 for b in data)):
        return None
    x, y = batch_cat(list(data)) if len(data) > 1 else data[0]
    w0 = params[layers[0][0]]
    if not (w0.dtype in _CHECK_TOL and x.ndim == 2 and x.dtype == w0.dtype
            and x.device == w0.device and y.ndim == 1 and y.shape[0] == x.shape[0]
            and all(v.dtype == w0.dtype and v.device == w0.device for v in params.values())):
        return None
    if y.dtype != torch.int64:  # uint8 indexes as a mask, int32 fails in cross_entropy
        return None
    classes = params[layers[-1][0]].shape[0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        return None  # ignored or invalid targets: the autodiff path treats (or names) them
    n = x.shape[0]
    widths = sum(params[w].shape[0] * 4 + params[w].shape[1] for w, _, _ in layers)
    if n * widths * w0.element_size() > memory_budget(memory):
        return None
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]
    P = sum(sizes)
    step = batch_rows or 64
    with torch.no_grad():
        live = {k: v.detach() for k, v in params.items()}
        f = _factors(layers, live, x, y)

    def on(rows: Tensor | None) -> Callable[[Tensor], Tensor]:
        fr = f if rows is None else {k: [None if t is None else t[rows] for t in v]
                                     if isinstance(v, list) else v[rows] for k, v in f.items()}
        count = n if rows is None else rows.numel()

        def matmat(V: Tensor) -> Tensor:
            parts = {k: t.reshape(V.shape[0], *s)
                     for k, t, s in zip(keys, V.split(sizes, dim=1), shapes, strict=True)}
            total = None
            with torch.no_grad():
                for s in range(0, count, step):
                    chunk = {k: [None if t is None else t[s:s + step] for t in v]
                             if isinstance(v, list) else v[s:s + step] for k, v in fr.items()}
                    out = _product(layers, live, chunk, parts)
                    flat = torch.cat([out[k].reshape(V.shape[0], -1) for k in keys], dim=1)
                    total = flat if total is None else total + flat
            return total / count

        return matmat

    op = MLPHessian(on(None), P, w0.dtype, w0.device, name="mlp_hessian")
    op._rows = lambda idx: LinOp(on(idx), P, w0.dtype, w0.device, name="mlp_hessian.on_rows")
    batch_size("mlp_hessian", "data", data[0])  # names an empty first batch
    if not _agrees(module, params, keys, x, y, op):
        return None
    return op


def _agrees(module: nn.Module, params: Params, keys: list, x: Tensor, y: Tensor,
            op: MLPHessian) -> bool:
    """Whether ``op``'s product on up to 64 examples spread over the data (first and last
    included) equals autodiff's Hessian-vector product through the module, within
    ``_CHECK_TOL`` of ``max |H v|`` plus 4x the cancellation the params' dtype itself imposes.

    The reference runs in float64 (the same ``v``, rounded to the params' dtype first), so the
    measured error is the product's own: on the trained digits MLP (softmax ~0.99 confident)
    a float32 autodiff reference adds its own 3-4e-6 of cancellation to ours' 1.9e-6. On a more
    confident model ``p - onehot`` and ``p Rz - p (p.Rz)`` cancel to ~``eps / (1 - p_y)`` of
    ``max |H v|`` in ANY product formed in the params' dtype (autodiff's too: 5e-4 in float32
    at a train loss of 3e-5), so that error, measured on the same rows as float32 autodiff's
    and scaled by ``eps(dtype) / eps(float32)``, is allowed on top; a dropped activation or
    layer is off by ~1e-1."""
    n = x.shape[0]
    rows = torch.linspace(0, n - 1, min(_CHECK_ROWS, n), dtype=torch.float64).round().long()
    rows = rows.unique().to(x.device)
    k = rows.numel()
    x, y = x[rows].double(), y[rows]
    dtype = params[keys[0]].dtype
    flat0 = torch.cat([params[key].detach().reshape(-1) for key in keys]).double()
    sizes = [params[key].numel() for key in keys]
    buffers = dict(module.named_buffers())

    def total(flat: Tensor) -> Tensor:
        p = {key: t.view_as(params[key]) for key, t in zip(keys, flat.split(sizes), strict=True)}
        out = call_module(module, {**buffers, **p}, (x,))
        return F.cross_entropy(out, y, reduction="sum")

    v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(device=flat0.device, dtype=dtype)
    ref = jvp(grad(total), (flat0,), (v.double(),))[1]
    got = op.on_rows(rows)(v[None])[0].double() * k
    err = float((got - ref).abs().max())
    scale = max(float(ref.abs().max()), 1e-30)
    if err <= _CHECK_TOL[dtype] * scale:
        return True
    x32, f32 = x.float(), flat0.float()
    module32 = {name: b.float() if b.is_floating_point() else b for name, b in buffers.items()}

    def total32(flat: Tensor) -> Tensor:
        p = {key: t.view_as(params[key]) for key, t in zip(keys, flat.split(sizes), strict=True)}
        return F.cross_entropy(call_module(module, {**module32, **p}, (x32,)), y,
                               reduction="sum")

    auto = jvp(grad(total32), (f32,), (v.float(),))[1].double()
    cancel = float((auto - ref).abs().max()) * (torch.finfo(dtype).eps
                                                / torch.finfo(torch.float32).eps)
    return err <= _CHECK_TOL[dtype] * scale + 4 * cancel
