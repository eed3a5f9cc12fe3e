"""Shared test helpers: count the plan decisions of layer_grads, or turn the certified path off.

A plan is decided either by the autodiff check (``layer_grads._check``, one call per check) or,
for a model mlp_io certifies, without it (``_certified`` returning a plan: issue 14, stop 25).
Tests that count "plan checks" count both, in one place (review RA F6), so a move of either
function changes this module only.
"""

from __future__ import annotations

from dattri_fn.transforms import layer_grads as _lg
from dattri_fn.transforms import layer_grads_certified as _lgc

# where _certified is looked up by certified_plan / _certified_grads (and so where it is patched)
_CERTIFIED_HOME = _lgc


def count_plan_decisions(monkeypatch) -> list:
    """Patch ``monkeypatch`` so that each plan decision appends 1 to the returned list: every
    call of ``layer_grads._check``, and every ``_certified`` call that decides a plan."""
    calls: list = []
    real_check, real_certified = _lg._check, _CERTIFIED_HOME._certified

    def check(*args, **kwargs):
        calls.append(1)
        return real_check(*args, **kwargs)

    def certified(*args, **kwargs):
        out = real_certified(*args, **kwargs)
        if out[0] is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(_lg, "_check", check)
    monkeypatch.setattr(_CERTIFIED_HOME, "_certified", certified)
    return calls


def no_certified(monkeypatch) -> None:
    """Patch ``monkeypatch`` so that every plan takes the autodiff check, as before issue 14."""
    monkeypatch.setattr(_CERTIFIED_HOME, "_certified", lambda *args, **kwargs: (None, {}))
