"""The ``text-lm`` task's model (see :mod:`dattri_fn.eval.tasks`): a one-block causal transformer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TinyLM(nn.Module):
    """A pre-LN one-block causal transformer.  # tokens [..., T] -> logits [..., T, V]"""

    def __init__(self, vocab: int, context: int, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.scale = math.sqrt(dim // heads)
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(context, dim))
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("causal", torch.ones(context, context).tril().bool(),
                             persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        h = self.tok(idx) + self.pos[:T]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        # [..., T, dim] -> [..., heads, T, dim/heads]; written out (not SDPA) so vmap works.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-2, -3) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / self.scale
        mask = self.causal.narrow(0, 0, T).narrow(1, 0, T)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(-2, -3).flatten(-2))
        h = h + self.fc2(torch.relu(self.fc1(self.ln2(h))))
        return self.head(self.ln_f(h))
