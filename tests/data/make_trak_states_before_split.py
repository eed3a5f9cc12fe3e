"""Write ``trak_states_before_split.pt``: TRAK states (projected, dense dual, factored) saved by
the code before trak.py's split (commit 6c822d2), with their state_hash, scores and self-scores
then, for tests/test_trak_state_split.py.

Run with that tree first on the path (the model and data are the test's ``problem()``):
    git archive 6c822d2 dattri_fn | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python tests/data/make_trak_states_before_split.py
"""

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(1, str(HERE.parent))

from test_trak_state_split import methods, problem  # noqa: E402

import dattri_fn.attribute  # noqa: E402
from dattri_fn import io  # noqa: E402
from dattri_fn.store import state_hash  # noqa: E402

if __name__ == "__main__":
    net, ckpts, train, test = problem()
    states = {k: m.prepare(ckpts, train) for k, m in methods(net).items()}
    ms = methods(net)
    out = {"states": states,
           "hashes": {k: state_hash(s) for k, s in states.items()},
           "scores": {k: ms[k].score(ckpts, s, None, test) for k, s in states.items()},
           "self": {k: ms[k].self_score(ckpts, s, None) for k, s in states.items()}}
    print(dattri_fn.attribute.__file__)
    io.save(out, HERE / "trak_states_before_split.pt")
