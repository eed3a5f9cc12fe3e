"""K-FAC's layer selection: which Linear-like layers own the params, and the argument checks
every factor pass shares (see :mod:`dattri_fn.operators.kfac` for the method)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .._checks import _msg, check_optional_int, check_params, iter_batches
from ..transforms import capture
from ..transforms.layers import layer_names, module_state
from .kfac_tied import tied_group

__all__ = ["kfac_tap"]


_KFAC_KINDS = ("linear", "conv1d", "conv2d")


def _keys(layer: str) -> tuple[str, str]:
    """The state keys of a layer's weight and bias (the root module's are bare)."""
    prefix = f"{layer}." if layer else ""
    return f"{prefix}weight", f"{prefix}bias"


def _kfac_specs(module: nn.Module, every: dict | None = None) -> dict:
    """The Linear / Conv1D / Conv2d entries of ``every`` (``capture.layer_specs(module)``)."""
    every = capture.layer_specs(module) if every is None else every
    return {n: s for n, s in every.items() if s.kind in _KFAC_KINDS}


def _unshared(module: nn.Module, specs: dict, every: dict) -> dict[str, str]:
    """``{layer: "shares its weight with layer <other>"}`` for the biased ``specs`` whose weight
    another layer of ``every`` (:func:`_kfac_specs`) reads with a bias of its own or none: the
    capture refuses that call ("its weight is used without its bias"), so the layer cannot be
    attributed. A module sharing the bias too is one layer applied twice, which it takes."""
    mods = dict(module.named_modules())
    holders: dict[int, list[str]] = {}
    for n in every:
        holders.setdefault(id(mods[n].weight), []).append(n)
    out = {}
    for n, s in specs.items():
        own = mods[n]
        if s.bias is None:
            continue
        others = [o for o in holders.get(id(own.weight), ()) if mods[o] is not own
                  and getattr(mods[o], "bias", None) is not own.bias]
        if others:
            out[n] = f"shares its weight with layer {others[0]}"
    return out


def _select(func: str, module, params, layers, *, tied: bool = False
            ) -> tuple[list[str], tuple[str, ...]]:
    """Return (layers in module order, param names in dict order); validate their match.

    Layers: ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv2d`` (ungrouped), the root
    module included (see :mod:`dattri_fn.transforms.capture`). ``tied=True`` (K-FAC/EK-FAC):
    a param shared by an Embedding and a Linear is one pooled layer, named after its first
    holder (:mod:`.kfac_tied`; :func:`_capture_layers` lists the members to capture). A param
    outside the selected layers is refused, naming it (see :func:`_select_parts`).
    """
    lin, pnames, _ = _select_parts(func, module, params, layers, tied=tied, others="error")
    return lin, pnames


def _select_parts(func: str, module, params, layers, *, tied: bool = False,
                  others: str = "error", every: dict | None = None
                  ) -> tuple[list[str], tuple[str, ...], dict[str, str]]:
    """:func:`_select` and the params outside the Kronecker layers: ``(layers, param names,
    {key: why it is outside})``.

    ``others="error"`` refuses such keys (the third item is then empty); ``"diagonal"``
    returns them with the reason, for :mod:`.kfac_diag`'s diagonal block, and then also takes
    the bias of a layer whose weight is not in ``params`` (the layer is not a Kronecker layer).
    ``every``: ``capture.layer_specs(module)`` where the caller holds it (read once per call).
    """
    every = capture.layer_specs(module) if every is None else every
    specs = _kfac_specs(module, every)
    groups = {}  # the pooled tied groups of the params' tied keys: group -> members
    unpooled = {}  # tied keys that cannot be pooled: key -> why
    # every tied key of params, read once (a key's entry does not depend on the others asked)
    shared = _tied_uses(module, list(params)) if tied else None
    if tied:
        for k in shared:
            members = tied_group(module, k, params)
            if isinstance(members, tuple):
                groups[members[0]] = members
            else:
                unpooled[k] = f"a tied weight K-FAC cannot pool: {members}"
    if layers is None:
        owned = set(params)
        lin = [n for n, sp in specs.items() if n not in groups
               and (sp.weight in owned or sp.bias in owned)] + list(groups)
        if others == "diagonal":  # a layer without its weight is no Kronecker layer
            lin = [n for n in lin if n in groups or specs[n].weight in owned]
    else:
        allowed = [n for n in every if n in specs or n in groups]
        kind = "nn.Linear, Conv1D or Conv2d" + (" (or a tied Embedding/Linear group)"
                                                 if groups else "")
        lin = layer_names(func, "layers", dict(module.named_modules()), layers, allowed, kind,
                          "K-FAC layers")
    order = {n: i for i, n in enumerate(every)}
    lin.sort(key=order.__getitem__)
    # A layer owning a tied weight that cannot be pooled (a biased head declared before its
    # embedding, two Linears sharing a weight): its own inputs and output gradients miss the
    # other uses' share of the weight's gradient, so it is no Kronecker layer.
    unpoolable = [n for n in lin if n not in groups and _keys(n)[0] in unpooled]
    if unpoolable and layers is not None:
        raise ValueError(_msg(func, "layers", "layers whose weight is their own or a poolable "
                              "tied group", "; ".join(f"{n!r}: {unpooled[_keys(n)[0]]}"
                                                      for n in unpoolable),
                              "Deselect these layers (with others='diagonal' their params take "
                              "the diagonal block) or leave their params out."))
    lin = [n for n in lin if n not in unpoolable]
    for grp in groups:
        if grp not in lin:
            unpooled[_keys(grp)[0]] = f"its tied group {grp!r} is not among the selected layers"
    owner = {}
    for name in lin:
        owner[_keys(name)[0]] = name
        if name not in groups:
            owner[_keys(name)[1]] = name
    stray = [k for k in params if k not in owner]
    if others == "diagonal":
        no_weight = [n for n in lin if _keys(n)[0] not in params]
        if no_weight:
            raise ValueError(_msg(func, "params", "the weight of every selected layer",
                                  f"no weight for {no_weight}",
                                  "Add '<layer>.weight' to params or deselect the layer."))
        return lin, tuple(params), {k: _why_outside(module, k, params, specs, lin, unpooled)
                                    for k in stray}
    if not stray:
        tied_stray = {}
    elif shared is None:
        tied_stray = _tied_uses(module, stray)
    else:
        tied_stray = {k: shared[k] for k in stray if k in shared}
    if tied_stray and not tied:
        raise ValueError(_msg(func, "params", "weights used by one layer each",
                              "; ".join(f"{k!r} shared by {uses}" for k, uses in
                                        tied_stray.items()),
                              "K-FAC/EK-FAC factor a weight from its one layer's inputs and "
                              "output gradients; a tied weight (GPT-2's wte = lm_head) has a "
                              "gradient summed over its uses, which this path does not "
                              "factor: leave it out of params (e.g. params=lambda n: "
                              "'wte' not in n) or attribute it with a dense method "
                              "(grad_dot, influence with solver='cg')."))
    if tied_stray:
        why = {k: tied_group(module, k, params) for k in tied_stray}
        raise ValueError(_msg(func, "params", "tied weights that K-FAC/EK-FAC can pool (one "
                              "nn.Embedding and one nn.Linear reading one weight, the key of "
                              "its first holder, no bias of theirs in params) and whose group "
                              "is selected",
                              "; ".join(f"{k!r} shared by {uses}: "
                                        f"{why[k] if isinstance(why[k], str) else 'not selected'}"
                                        for k, uses in tied_stray.items()),
                              "Leave the weight out of params (e.g. params=lambda n: 'wte' not "
                              "in n), select its group in layers, or attribute it with a dense "
                              "method (grad_dot, influence with solver='cg')."))
    if stray:
        raise ValueError(_msg(func, "params", "only weights/biases of the selected nn.Linear, "
                              f"Conv1D or Conv2d layers {lin}", f"other keys {stray}",
                              "K-FAC covers those layers only: drop these keys from params, "
                              "select their layers, or pass others='diagonal' (their exact "
                              "empirical-Fisher diagonal as their block)."))
    no_weight = [n for n in lin if _keys(n)[0] not in params]
    if no_weight:
        raise ValueError(_msg(func, "params", "the weight of every selected layer",
                              f"no weight for {no_weight}",
                              "Add '<layer>.weight' to params or deselect the layer."))
    return lin, tuple(params), {}


def _why_outside(module: nn.Module, key: str, params, specs, layers, unpooled) -> str:
    """Why the param ``key`` is no Kronecker layer's: the reason the warning names."""
    if key in unpooled:
        return unpooled[key]
    holder = key.rpartition(".")[0]
    if holder in specs:
        if specs[holder].weight not in params:
            return f"the bias of {holder!r}, whose weight is not in params"
        if specs[holder].weight in unpooled:
            return f"the bias of {holder!r}, whose tied weight K-FAC cannot pool"
        return f"its layer {holder!r} is not among the selected layers"
    kind = type(dict(module.named_modules()).get(holder)).__name__
    if kind == "Embedding":
        return "an nn.Embedding weight (Kronecker layers: Linear, Conv1D, Conv2d)"
    return f"a parameter of a {kind}, not of an nn.Linear, Conv1D or Conv2d"


def _capture_layers(module: nn.Module, names, params, every: dict | None = None) -> list[str]:
    """The layers to capture for K-FAC layers ``names`` (:func:`_select_parts`' for
    ``params``): each tied group's members in place of the group (module order). ``every``:
    ``capture.layer_specs(module)`` where the caller holds it."""
    # one read of the module's tied keys for every layer (as _group_of's, layer by layer)
    shared = _tied_uses(module, [_keys(n)[0] for n in names])
    out = set()
    for n in names:
        members = tied_group(module, _keys(n)[0], params) if _keys(n)[0] in shared else None
        out.update(members if isinstance(members, tuple) else (n,))
    order = {n: i for i, n in enumerate(capture.layer_specs(module) if every is None else every)}
    return sorted(out, key=order.__getitem__)


def _tied_uses(module: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{key: "'name' (Kind), ..."}`` for the keys whose tensor several modules hold (one
    module reached under several names, e.g. a Linear applied twice, holds its own)."""
    names: dict[int, list[str]] = {}
    for k, v in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(v), []).append(k)
    modules = dict(module.named_modules(remove_duplicate=False))
    alias = {k: ks for ks in names.values()
             if len({id(modules[a.rpartition(".")[0]]) for a in ks}) > 1 for k in ks}
    out = {}
    for k in keys:
        if k in alias:
            owners = [a.rpartition(".")[0] for a in alias[k]]
            out[k] = ", ".join(f"{o!r} ({type(modules[o]).__name__})" for o in owners)
    return out


def _check_call(func, module, loss_fn, params, data, layers, chunk_size, tapped=None, *,
                tied: bool = False):
    """Validate a factor pass's arguments: ``(state, layers, param names, batches, tapped,
    chunk_size)``; a param outside the selected layers is refused."""
    return _check_call_parts(func, module, loss_fn, params, data, layers, chunk_size, tapped,
                             tied=tied)[0]


def _check_call_parts(func, module, loss_fn, params, data, layers, chunk_size, tapped=None, *,
                      tied: bool = False, others: str = "error"):
    """:func:`_check_call` and ``{key: why}`` of the params outside the Kronecker layers
    (``others="diagonal"``, see :func:`_select_parts`)."""
    if not isinstance(module, nn.Module):
        raise TypeError(_msg(func, "module", "an nn.Module", type(module).__name__))
    if not callable(loss_fn):
        raise TypeError(_msg(func, "loss_fn", "a callable loss_fn(output, target)",
                             type(loss_fn).__name__))
    chunk_size = check_optional_int(func, "chunk_size", chunk_size)
    state = module_state(func, module, params)
    every = capture.layer_specs(module)
    names, param_names, rest = _select_parts(func, module, params, layers, tied=tied,
                                             others=others, every=every)
    batches = iter_batches(func, "data", data, ordered=False)  # a sum over rows
    members = _capture_layers(module, names, params, every) if tied else names
    if tapped is None:
        tapped = capture.tap(module, members, tied=True) if tied else capture.tap(module, names)
    elif getattr(tapped, "module", None) is not module or list(tapped.layers) != list(members) \
            or (members != names and not getattr(tapped, "tied", ())):
        got = ("a tap of another module" if getattr(tapped, "module", None) is not module
               else f"a tap of layers {list(tapped.layers)}" + (
                   "" if list(tapped.layers) != list(members) else " without tied=True"))
        raise ValueError(_msg(func, "tapped", f"tap_layers(module, {members}) of this module",
                              got, "Pass the tapped function from a call on the same module "
                              "and layers, or None."))
    return (state, names, param_names, batches, tapped, chunk_size), rest


def kfac_tap(module: nn.Module, params, *, layers: str | Iterable[str] | None = None):
    """Return the tapped forward that :func:`kfac_factors` traces for ``params`` / ``layers``.

    Pass it as ``tapped=`` to repeated :func:`kfac_factors` / :func:`ekfac_factors` calls on
    the same module (see :func:`dattri_fn.transforms.capture.tap`). A weight tied between an
    Embedding and a Linear (GPT-2's ``wte`` = ``lm_head``) is captured as both members
    (``tied=True``, ``tapped.tied``), pooled by :mod:`.kfac_tied`. Params outside the
    Kronecker layers are not captured (their block is diagonal, :mod:`.kfac_diag`);
    ``layers=[]``: no layer at all (a state whose params are all in that block).
    """
    func = "kfac_tap"
    if not isinstance(module, nn.Module):
        raise TypeError(_msg(func, "module", "an nn.Module", type(module).__name__))
    params = check_params(func, "params", params)
    if isinstance(layers, (list, tuple)) and not layers:  # every param in the diagonal block
        return capture.tap(module, [], tied=True)
    every = capture.layer_specs(module)
    names = _select_parts(func, module, params, layers, tied=True, others="diagonal",
                          every=every)[0]
    return capture.tap(module, _capture_layers(module, names, params, every), tied=True)
