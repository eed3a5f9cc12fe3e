"""The ``(a, g)`` of a plain softmax cross-entropy MLP's Linear layers, by the ops autograd runs.

For ``nn.Linear`` alone, or ``nn.Sequential(Linear, act..., Linear, ..., Linear)`` with ``act`` in
:data:`ACTIVATIONS` (exact types, no hooks), called on one ``[B, in]`` input with the summed
loss ``F.cross_entropy(z_L, y, reduction="sum")`` on int64 labels, every layer's input ``a_l``
and output gradient ``g_l = dL/dz_l`` are (``z_l = a_l W_l^T + b_l``, ``s`` the activations):

    g_L     = _log_softmax_backward(nll_loss_backward(1, log_softmax(z_L), y), log_softmax(z_L))
    g_{l-1} = s'-backward(g_l W_l)        (tanh_backward, sigmoid_backward, threshold_backward)

the very ATen kernels autograd's backward of that forward calls, on the same operands in the
same order, so the values equal the capture engine's
(:func:`~dattri_fn.transforms.layers.batched_io`) bit for bit (tests/test_mlp_io.py). What it
saves is everything around the arithmetic: the tapped ``functional_call``, the autograd graph
and engine, the probes (~0.4 ms of a 0.45 ms pass on the 500-row digits model, one CPU thread).

:func:`mlp_io` returns None wherever that equality is not certain (another structure or loss, a
hook, a tied or reused Linear, a dtype/device mix, inside a torch.func transform,
``inference_mode``, ``torch.autocast`` or a torch-function/dispatch mode, ``with torch.device(...)``
included): the caller then runs the capture engine, which also owns every error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .layers import cross_entropy_rows

_SUM = 2  # ATen's Reduction::Sum
_IGNORE = -100  # F.cross_entropy's default ignore_index
_NLL_BACKWARD = torch.ops.aten.nll_loss_backward.default

# activation type -> (forward, backward(grad, forward's output)): autograd's saved-result
# formulas, written over ``grad`` (a temporary of ours: elementwise, so no [B, width] copy)
ACTIVATIONS = {
    nn.Tanh: (torch.tanh, lambda g, y: torch.ops.aten.tanh_backward.grad_input(g, y, grad_input=g)),
    nn.Sigmoid: (torch.sigmoid,
                 lambda g, y: torch.ops.aten.sigmoid_backward.grad_input(g, y, grad_input=g)),
    nn.ReLU: (torch.relu,
              lambda g, y: torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)),
}
# in-place forms of the same kernels, for an activation applied to a Linear's fresh output
_IN_PLACE = {nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_, nn.ReLU: torch.relu_}
_ONES: dict = {}  # (dtype, device) -> 0-d one: the backward's grad_output, never written


def _one(dtype, device) -> Tensor:
    one = _ONES.get((dtype, device))
    if one is None:
        one = _ONES[(dtype, device)] = torch.ones((), dtype=dtype, device=device)
    return one


# the forwards whose ops the kernels below reproduce, as torch defines them, and the functions
# those forwards call by module attribute: a class- or module-level patch of any of them
# (``nn.Linear.forward = ...``, ``F.linear = ...``, ``torch.tanh = ...``) makes the engine
# compute another model than these kernels, so mlp_io declines (review RA F4, stop 25). A forward
# already replaced when this module was imported is not recorded (its qualname or module is not
# torch's): declined too.
_FORWARDS = tuple((cls, cls.forward if cls.forward.__qualname__ == f"{cls.__name__}.forward"
                   and cls.forward.__module__ == cls.__module__ else None)
                  for cls in (nn.Linear, nn.Sequential, *ACTIVATIONS))
_LINEAR, _F_RELU, _RELU, _TANH, _SIGMOID = F.linear, F.relu, torch.relu, torch.tanh, torch.sigmoid


def _torch_forwards() -> bool:
    """Whether the forwards of :data:`_FORWARDS`' classes and the functions they call (F.linear,
    F.relu, torch.relu/tanh/sigmoid) are the ones recorded at import (one identity test each per
    call, spelled out: no generator)."""
    for cls, fn in _FORWARDS:
        if cls.forward is not fn:
            return False
    return (F.linear is _LINEAR and F.relu is _F_RELU and torch.relu is _RELU
            and torch.tanh is _TANH and torch.sigmoid is _SIGMOID)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
           "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def _plain(m: nn.Module) -> bool:
    """Its class's forward runs, with no hook of its own (:data:`_HOOKS`, spelled out: no
    generator per module)."""
    d = vars(m)  # (the hook dicts are instance attributes: read without a getattr per name)
    return "forward" not in d and not (d.get("_forward_hooks") or d.get("_forward_pre_hooks")
                                       or d.get("_backward_hooks") or d.get("_backward_pre_hooks"))


def _global_hooks() -> bool:
    """Whether a global module hook is registered: torch's own test where it has one (it reads
    the hook dicts at call time: every one of :data:`_GLOBAL` and the kwargs flags), else each
    of :data:`_GLOBAL` that this torch defines."""
    has = getattr(_module, "_has_any_global_hook", None)
    if has is not None:
        return bool(has())
    return any(getattr(_module, h, None) for h in _GLOBAL)


def plain_context() -> bool:
    """Whether the engine would run the ops these kernels reproduce: outside torch.func
    transforms and inference mode, no autocast (it recasts the engine's forward ops, not these
    kernels' operands), no torch-function or dispatch mode (it sees, and may change, the engine's
    ops only), no global module hook (:func:`_global_hooks`) and torch's own forwards
    (:func:`_torch_forwards`). The one gate of :func:`mlp_io` and of
    :mod:`dattri_fn.attribute.trak_mlp`'s margin pass."""
    return not (torch._C._functorch.maybe_current_level() is not None
                or torch.is_inference_mode_enabled()
                or torch._C._is_any_autocast_enabled()
                or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()
                or _global_hooks()) and _torch_forwards()


def _slots(lin: nn.Linear) -> tuple | None:
    """``(weight, bias)`` from the Parameter slots nn.Linear registers (no Module.__getattr__);
    None where a slot is gone or its weight is None (deleted or replaced: the engine's case)."""
    params = lin._parameters
    if "weight" not in params or "bias" not in params or params["weight"] is None:
        return None
    return params["weight"], params["bias"]


def mlp_chain(module: nn.Module) -> list | None:
    """``[(layer name, Linear, [activation types after it])]`` of a supported MLP, else None.

    Walks ``Sequential._modules`` (what its forward runs; one activation object may repeat).
    A Linear object, weight or bias met twice gives None (autograd sums its two uses), as does
    an in-place ReLU, an activation before the first Linear or after the last."""
    if type(module) is nn.Linear:
        return [("", module, [])] if _plain(module) and _slots(module) is not None else None
    if type(module) is not nn.Sequential or not _plain(module):
        return None
    chain, seen = [], set()
    for name, child in module._modules.items():
        if child is None or not _plain(child):
            return None
        if type(child) is nn.Linear:
            slots = _slots(child)
            if slots is None:
                return None
            w, b = slots
            ids = {id(child), id(w)} | ({id(b)} if b is not None else set())
            if ids & seen:
                return None
            seen |= ids
            chain.append((name, child, []))
        elif type(child) in ACTIVATIONS and chain and not vars(child).get("inplace", False):
            chain[-1][2].append(type(child))
        else:
            return None
    if not chain or chain[-1][2]:
        return None
    return chain


def _summed_cross_entropy(loss_fn) -> bool:
    """Whether the capture pass takes ``F.cross_entropy(out, y, reduction="sum")`` for this loss
    (:func:`~dattri_fn.transforms.layers.summed_losses` on ``[B, C]`` logits, class indices)."""
    rows = getattr(loss_fn, "per_example", None)
    return rows is cross_entropy_rows or (rows is None and loss_fn is F.cross_entropy)


def chain_weights(chain: list, state: dict, x, target, *, frozen: bool = False) -> list | None:
    """``[(W, b or None)]`` of ``chain``'s Linear layers from ``state``, or None unless ``x`` is a
    strided float32/float64 ``[B, in]`` Tensor, ``target`` int64 labels ``[B]`` on its device,
    and every weight and bias a strided Tensor of ``x``'s dtype and device (``frozen``: also a
    plain Tensor that does not require grad)."""
    if not (type(x) is Tensor and x.ndim == 2 and x.layout == torch.strided
            and x.dtype in (torch.float32, torch.float64)
            and type(target) is Tensor and target.dtype == torch.int64 and target.ndim == 1
            and target.shape[0] == x.shape[0] and target.device == x.device):
        return None
    weights = []
    for name, lin, _ in chain:
        pre = f"{name}." if name else ""
        W = state.get(pre + "weight")
        b = state.get(pre + "bias") if lin._parameters["bias"] is not None else None
        for t in (W,) if lin._parameters["bias"] is None else (W, b):
            if not (isinstance(t, Tensor) and t.dtype == x.dtype and t.device == x.device
                    and t.layout == torch.strided
                    and (not frozen or (type(t) is Tensor and not t.requires_grad))):
                return None
        weights.append((W, b))
    return weights


def mlp_io(module: nn.Module, loss_fn, state: dict, args: tuple, kwargs: dict, target,
           layers: tuple[str, ...]) -> dict | None:
    """Return ``{layer: (a [B, in], g [B, out])}`` of the named Linear layers of a plain MLP
    (module docstring), equal bit for bit to the capture engine's, or None where that is not
    certain (then nothing has run).

    Args:
        module: the model (``nn.Linear`` or an ``nn.Sequential`` MLP).
        loss_fn: the model's loss; only the softmax cross-entropy is taken.
        state: every parameter and buffer of ``module`` by name (``functional_call``'s).
        args, kwargs, target: the batch as ``unpack`` gives it: ``(x [B, in],)``, ``{}``,
            int64 labels ``[B]``.
        layers: the Linear layers wanted (names as in ``module``; ``""`` for a bare Linear).
    """
    if len(args) != 1 or kwargs or not _summed_cross_entropy(loss_fn) or not plain_context():
        return None
    chain = mlp_chain(module)
    if chain is None or not set(layers) <= {n for n, _, _ in chain}:
        return None
    x, weights = args[0], chain_weights(chain, state, args[0], target)
    if weights is None:
        return None
    first = min(i for i, (n, _, _) in enumerate(chain) if n in layers)
    one = _one(x.dtype, x.device)
    with torch.no_grad():
        # the input read detached, as the engine's probes read it: no a carries the caller's graph
        # (a tensor outside autograd is read as it is: its detached alias is the same values)
        ins, outs, h = [], [], x.detach() if x.requires_grad else x
        for (_, _, acts), (W, b) in zip(chain, weights, strict=True):
            ins.append(h)
            # aten::linear's own dispatch for a 2-d input: addmm(b, h, W^T), or mm without b
            h = h.mm(W.t()) if b is None else torch.addmm(b, h, W.t())
            ys = []
            for j, act in enumerate(acts):
                # the first activation overwrites the fresh z (only its output is saved)
                h = _IN_PLACE[act](h) if j == 0 else ACTIVATIONS[act][0](h)
                ys.append(h)
            outs.append(ys)
        logp = torch._log_softmax(h, 1, False)
        # autograd's NllLossBackward takes nll_loss_forward's total_weight, which the summed
        # reduction never reads (only "mean" divides by it): the forward is not run. The backward
        # checks the labels as the forward does (same IndexError, "Target 10 is out of bounds.")
        g = _NLL_BACKWARD(one, logp, target, None, _SUM, _IGNORE, one)
        g = torch._log_softmax_backward_data(g, logp, 1, logp.dtype)
        out = {}
        for i in range(len(chain) - 1, first - 1, -1):
            name = chain[i][0]
            if name in layers:
                out[name] = (ins[i], g)
            if i == first:
                break
            a, W = ins[i], weights[i][0]
            # AddmmBackward's grad for its mat1 (mm_mat1_backward): column-major input aside
            if a.stride(0) == 1 and a.stride(1) == a.shape[0]:
                e = W.t().mm(g.t()).t()
            else:
                e = g.mm(W)
            for act, y in zip(reversed(chain[i - 1][2]), reversed(outs[i - 1]), strict=True):
                e = ACTIVATIONS[act][1](e, y)
            g = e
    return {n: out[n] for n in layers}


__all__ = ["ACTIVATIONS", "mlp_chain", "mlp_io", "plain_context"]
