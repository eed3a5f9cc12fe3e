"""Peak memory of K-FAC's factor passes with an untied nn.Embedding [V, d] in the diagonal block
(review F3 of stop 20): the diagonal pass's per-example gradients are held a block of ~2**20
entries at a time (kfac_diag._DIAG_ENTRIES), not [chunk, V d].

    OMP_NUM_THREADS=1 python -m benchmarks.kfac_diag_peak emb|kron [--vocab 20000 --dim 32]

One mode per process (peak RSS only grows): after a warm-up call on a small vocabulary (torch.func's
own first-use memory), prints the growth of the peak RSS over one kfac_factors call with every
param (emb: the embedding in the diagonal block) or the Kronecker params only (kron), then the
exact tensor peak of a second call (benchmarks.peak.tensor_peak), and the bytes one unblocked
[batch, V d] chunk of per-example gradients takes. A before row: run from another directory
with PYTHONPATH=<older tree>:<this repo> (``-m`` puts the working directory first on the path).
"""

import argparse
import resource
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.peak import tensor_peak
from dattri_fn.operators.kfac import kfac_factors


class LM(nn.Module):
    def __init__(self, V: int, d: int):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(V, d), nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.emb(x)))).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["emb", "kron"])
    ap.add_argument("--vocab", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.tokens))
    y = torch.randint(0, 10, (a.batch,))

    def params(m):
        return {k: v.detach() for k, v in m.named_parameters()
                if a.mode == "emb" or not k.startswith("emb")}

    small = LM(50, a.dim).eval()
    kfac_factors(small, F.cross_entropy, params(small), (x[:4] % 50, y[:4]))  # warm-up
    m = LM(a.vocab, a.dim).eval()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    f = kfac_factors(m, F.cross_entropy, params(m), (x, y))
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    _, peak = tensor_peak(lambda: kfac_factors(m, F.cross_entropy, params(m), (x, y)))
    print(f"{a.mode}: peak RSS grew {grew:.1f} MiB over one kfac_factors call, tensor peak "
          f"{peak / 2**20:.2f} MiB (diagonal keys {list(f.diagonal)}); one unblocked chunk "
          f"[{a.batch}, {a.vocab * a.dim}] float32 = {a.batch * a.vocab * a.dim * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
