"""Write ``kfac_states_before_diagonal.pt``: K-FAC/EK-FAC factors saved by the code before the
``diagonal`` field (commit 5be7158, the parent of 2cfddef), for tests/test_io_old_states.py.

Run with that tree first on the path (the model and data are the test's ``problem()``):
    git archive 5be7158 dattri_fn | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python tests/data/make_kfac_states_before_diagonal.py
"""

import sys
from pathlib import Path

import torch.nn.functional as F

HERE = Path(__file__).parent
sys.path.insert(1, str(HERE.parent))

from test_io_old_states import problem  # noqa: E402

from dattri_fn import io  # noqa: E402
from dattri_fn.operators.kfac import ekfac_factors, kfac_factors  # noqa: E402

if __name__ == "__main__":
    net, params, data = problem()
    states = {"kfac": kfac_factors(net, F.cross_entropy, params, data),
              "ekfac": ekfac_factors(net, F.cross_entropy, params, data)}
    assert all("diagonal" not in type(s)._fields for s in states.values()), "run the old tree"
    io.save(states, HERE / "kfac_states_before_diagonal.pt")
