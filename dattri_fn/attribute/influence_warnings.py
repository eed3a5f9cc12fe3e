"""Each warning once per call over checkpoints (:func:`once_per_call`).

Moved from :mod:`.influence_inverse` (stop 25, no behaviour change); it re-exports it.
"""

from __future__ import annotations

import re
import warnings

# a measurement: a number with a decimal point or an exponent (3.1e-01, 0.25, 1e-12)
_MEASURE = re.compile(r"[-+]?(?:\d+\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+)")
# a quoted name: a layer ('0'), a key ('2.weight'); not an apostrophe (model's)
_QUOTED = re.compile(r"((?<!\w)'[^']*')")


def _shape_of(message: str) -> str:
    """A warning's text with its measurements blanked: the same reason on another checkpoint (a
    gradient scale, a difference) reads the same. Quoted names are kept whole, digits and all:
    a warning about another layer of an ``nn.Sequential`` ('2', not '0') is not a repeat."""
    parts = _QUOTED.split(message)  # odd items: the quoted names
    return "".join(part if i % 2 else _MEASURE.sub("#", part) for i, part in enumerate(parts))


def once_per_call(build, ckpts) -> tuple:
    """``build(p)`` for every checkpoint, each warning issued once per call (review R1 F7): a
    later checkpoint's warning that reads as an earlier one's but for its numbers (the same
    layers moved for the same reason) is not repeated."""
    states, seen = [], set()
    for p in ckpts:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            states.append(build(p))
        for w in got:
            shape = (w.category, _shape_of(str(w.message)))
            if shape not in seen:
                seen.add(shape)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return tuple(states)
