"""A submodule applied twice keeps its own parameters through every functional call.

torch.func.functional_call (2.13) leaves the caller's tensor in such a submodule; the library's
calls go through dattri_fn.module_call.call_module, which puts the originals back.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import dattri_fn
from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.attribute.trak import classification_margin_loss, classification_weight_loss, trak
from dattri_fn.module_call import call_module, shared_slots


def _reused(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    lin = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), lin, nn.Tanh(), lin,
                         nn.Linear(5, 3)).double().eval()


def _data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def _identity(module: nn.Module) -> list:
    return [(n, id(p)) for n, p in module.named_parameters(remove_duplicate=False)]


def test_torch_functional_call_leaves_the_callers_tensor():
    """The torch behaviour this module works around (if torch fixes it, call_module is moot)."""
    m = _reused()
    p = {k: v.detach() + 1 for k, v in m.named_parameters()}
    before = m[2].weight
    functional_call(m, p, (_data(1, 3)[0],), strict=True, tie_weights=True)
    assert m[2].weight is not before


@pytest.mark.parametrize("batched", [False, True])
def test_call_module_restores_a_shared_submodule(batched):
    m = _reused()
    ids = _identity(m)
    p = {k: v.detach() + 1 for k, v in m.named_parameters()}
    x = _data(1, 3)[0]
    want = functional_call(_reused(), p, (x,), strict=True)
    if batched:
        pb = {k: v.expand(3, *v.shape).clone() for k, v in p.items()}
        got = vmap(lambda q, xi: call_module(m, q, (xi[None],), strict=True)[0])(pb, x)
    else:
        got = call_module(m, p, (x,), strict=True)
    assert _identity(m) == ids
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # vmap: row GEMMs round
    with pytest.raises(RuntimeError):
        call_module(m, p, (torch.ones(3, 7, dtype=torch.float64),))  # a raising call restores too
    assert _identity(m) == ids


def test_the_library_calls_modules_through_call_module():
    """Every functional call of a user's module goes through call_module (a direct
    torch.func.functional_call would leave a shared submodule holding the caller's tensor)."""
    root = Path(dattri_fn.__file__).parent
    direct = [f"{path.relative_to(root)}:{i}" for path in sorted(root.rglob("*.py"))
              if path.name != "module_call.py"
              for i, line in enumerate(path.read_text().splitlines(), 1)
              if "functional_call(" in line and "``" not in line and not line.lstrip().startswith("#")]
    assert direct == []


def test_shared_slots_only_for_reached_twice():
    assert shared_slots(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) == ()
    m = _reused()
    assert sorted(name for _, name in shared_slots(m)) == ["bias", "weight"]


def test_trak_and_grad_dot_leave_a_reused_linear_alone():
    """TRAK's vmapped passes at three checkpoints used to leave a checkpoint's (or a vmapped)
    tensor in the shared Linear: a second run on the same module scored off, silently."""
    m = _reused()
    ids = _identity(m)
    fm = functional_model(m, classification_margin_loss)
    g = torch.Generator().manual_seed(5)
    params = [dict(fm.params)] + [
        {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in fm.params.items()}
        for _ in range(2)]
    train, test = [_data(2, 9)], _data(4, 6)

    def run(module):
        f = functional_model(module, classification_margin_loss)
        meth = trak(f, weight_fn=functional_model(module, classification_weight_loss), proj_dim=5,
                    damping=0.1, seed=3)
        return meth.score(params, meth.prepare(params, train), train, test)

    first = run(m)
    assert _identity(m) == ids
    torch.testing.assert_close(run(m), first, rtol=0, atol=0)
    own = functional_model(m, classification_margin_loss).params  # what a user's next call reads
    for k, v in fm.params.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    torch.testing.assert_close(run(_reused()), first, rtol=0, atol=0)
    gd = grad_dot(functional_model(m, F.cross_entropy))
    gd.score(params[1], gd.prepare(params[1], train), train, test)
    assert _identity(m) == ids
