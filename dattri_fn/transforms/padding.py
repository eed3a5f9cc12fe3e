"""Padding positions of a batch, for the per-token statistics of K-FAC, EK-FAC and LoGra.

A batch marks padding the Hugging Face way: a Mapping whose ``"attention_mask"`` is a ``[B, T]``
tensor, zero at pad positions. (Labels ``-100`` only drop positions from the loss: their ``g``
is zero, but the layer inputs ``a`` there are the model's activations of pad tokens.) A layer
input ``a`` ``[B, T, d]`` of such a batch enters an input second moment only at its real
positions, each example normalised by its own count ``T_n`` of real positions:

    A_n = (1/T_n) sum_{t: mask_nt != 0} a_nt a_nt^T        (an example with T_n = 0 adds 0)

which is what the same example gives unpadded (``T_n = T``), so the statistics do not depend on
right padding or on per-batch (dynamic) padding. A layer whose positions are not the mask's (a
pooled ``[B, d]`` head has none: nothing to mask) is taken unmasked after one warning naming it.
A Hugging Face encoder-decoder's decoder reads ``decoder_attention_mask``'s positions, not
``attention_mask``'s (:class:`Positions`: layers are matched to a mask by more than width).

Left padding is masked the same way, but the statistics equal the unpadded example's only if
the model and loss see it as unpadded too: pass ``position_ids`` (counted from the first real
token: HF models otherwise number the pads first) and set the label of the first real token to
-100 (a causal LM loss's shift would otherwise let the last pad "predict" it).
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["Positions", "absolute_positions", "padding_mask", "real_gram", "watch_left_padding"]


def padding_mask(batch) -> Tensor | None:
    """Return the real positions ``[B, T]`` (bool) of a batch that has padding, else None.

    None for a batch without a 2-D ``"attention_mask"`` (a tuple or tensor batch cannot say
    which positions are padding) or one whose mask has no zero: such batches take the unmasked
    statistics unchanged.
    """
    if type(batch) is tuple or not isinstance(batch, Mapping):  # (tuple: no abc check)
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return None
    real = mask != 0
    return None if bool(real.all()) else real


def real_gram(a: Tensor, real: Tensor, bias: bool = False) -> Tensor:
    """Return ``sum_n (1/T_n) sum_{t real} a_nt a_nt^T`` (``a`` augmented to ``[a, 1]`` with
    ``bias``).  # a [B, T, d], real [B, T] -> [d(+1), d(+1)]

    Only the real rows are gathered (pad activations may be anything, non-finite included) and
    scaled by ``sqrt(1/T_n)`` so that the product is one symmetric Gram matrix.
    """
    counts = real.sum(1, keepdim=True).clamp_min(1).to(a.dtype)
    w = counts.reciprocal().sqrt().expand(real.shape)[real]  # [R]
    rows = a[real]  # [R, d], a copy
    if bias:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
    rows.mul_(w[:, None])
    return rows.T @ rows


# Keys of a Mapping batch that describe the same positions as its attention_mask; another
# sequence's key (_sequence_key) of the mask's width may be a second sequence (a dual encoder's
# other tower), a model's own input under another name (``"x"``) is not
_SAME_POSITIONS = frozenset(("input_ids", "attention_mask", "token_type_ids", "position_ids",
                             "labels", "label", "label_ids", "inputs_embeds", "special_tokens_mask",
                             "global_attention_mask", "cache_position"))
# an encoder-decoder's keys of its decoder's positions (Hugging Face names)
_DECODER_KEYS = ("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds",
                 "decoder_position_ids")
# cross-attention blocks (BART family and Whisper, BERT-style decoders, T5) and their key/value
# projections, which read the ENCODER's positions; queries and outputs read the decoder's
_CROSS_BLOCKS = ("encoder_attn", "crossattention", "EncDecAttention", "cross_attn",
                 "cross_attention")
_CROSS_KV = frozenset(("k_proj", "v_proj", "k", "v", "key", "value", "kv", "kv_proj", "to_k",
                       "to_v", "to_kv", "k_lin", "v_lin"))
_CROSS_Q_OUT = frozenset(("q_proj", "q", "query", "to_q", "q_lin", "out_proj", "o", "o_proj",
                          "dense", "to_out", "out_lin"))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_call() -> tuple[int, str]:
    """``(stacklevel, name)`` for a warning issued by the caller of the function calling this:
    the first frame outside ``dattri_fn`` (the user's line) and the library function it called
    (``logra.<locals>.prepare`` -> ``logra(...).prepare``)."""
    frame, level, entry = sys._getframe(2), 2, None
    while frame is not None and frame.f_code.co_filename.startswith(_ROOT):
        entry, frame, level = frame.f_code, frame.f_back, level + 1
    name = entry.co_qualname.replace(".<locals>.", "(...).") if entry is not None else "?"
    return level, name


# the learned absolute position tables of Hugging Face models that number positions from the
# first column whatever the mask says: GPT-2/GPT-Neo ``wpe``, the BERT family's
# ``position_embeddings``, the BART family's ``embed_positions`` (arange + offset). Not a table
# with a padding_idx (RoBERTa counts positions from input_ids' non-pad tokens) nor one whose
# forward takes the mask (OPT, BioGPT count from it): left padding does not move those
_ABSOLUTE = frozenset(("wpe", "position_embeddings", "embed_positions"))


def absolute_positions(module) -> bool:
    """Whether ``module`` adds learned absolute position embeddings numbered from the first
    column (GPT-2's ``wpe``, BERT's, BART's): an ``nn.Embedding`` by those names with no
    ``padding_idx`` and no mask argument. Rotary and ALiBi models (Llama, Qwen, BLOOM) have none."""
    kind = getattr(getattr(module, "config", None), "position_embedding_type", None)
    if isinstance(kind, str) and kind != "absolute":
        return False  # relative_key(_query): no absolute table is added
    for n, m in module.named_modules():
        if (isinstance(m, nn.Embedding) and n.rsplit(".", 1)[-1] in _ABSOLUTE
                and m.padding_idx is None):
            if type(m) is nn.Embedding:
                return True
            args = list(inspect.signature(type(m).forward).parameters)[1:2]
            if args != ["attention_mask"]:
                return True
    return False


def _outer_call() -> tuple[int, str]:
    """``(stacklevel, name)`` of the user's line that called the library, from its caller's
    caller up (torch frames between library frames included); ``(0, "?")`` outside the library.
    A private entry's closure says its public name (``_gradient_similarity``'s ``name``)."""
    frame, level, found = sys._getframe(2), 2, (0, None)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_ROOT):
            found = (level + 1, frame)
        frame, level = frame.f_back, level + 1
    level, entry = found
    if entry is None:
        return 0, "?"
    qual = entry.f_code.co_qualname
    public = entry.f_locals.get("name") if qual.startswith("_") else None
    if isinstance(public, str) and public.isidentifier() and ".<locals>." in qual:
        return level, f"{public}(...).{qual.rsplit('.', 1)[-1]}"
    return level, qual.replace(".<locals>.", "(...).")


_LOOKS = 16  # library forwards read at most, waiting for a batch with padding
_WATCHED = weakref.WeakSet()  # modules with the left-padding hook (one each)


def watch_left_padding(module: nn.Module) -> None:
    """Warn once, at the user's line, where a library call first runs ``module`` (a model with
    :func:`absolute_positions`) on a left-padded batch (a row whose ``attention_mask`` is 0 in
    the first column and not everywhere) without ``position_ids``: each example's tokens then
    take positions shifted by its pad count, and its scores are not the unpadded example's
    (GPT-2: 72%, review RU5 L1). A forward pre-hook, removed after the first ``[B, T]`` mask
    with padding or the 16th library forward (one host read each): the first padded batch
    decides, as a tokenizer pads on one side. ``unpack`` stays the caller's, so no fast path
    changes; a per-example call under vmap and the user's own forwards are not read (RI MED-1)."""
    if module in _WATCHED:
        return
    _WATCHED.add(module)
    hook = _LeftPadHook()
    hook.handle = module.register_forward_pre_hook(hook, with_kwargs=True)


class _LeftPadHook:
    """:func:`watch_left_padding`'s hook: an object, not a closure, so a model that carries it
    still pickles (``torch.save(model)``); a copy loaded from a pickle no longer watches."""

    def __init__(self):
        self.done, self.seen, self.handle = False, 0, None

    def __getstate__(self):
        return {"done": True, "seen": self.seen, "handle": None}

    def __call__(self, mod, args, kwargs):
        mask = kwargs.get("attention_mask")
        if self.done or (isinstance(mask, Tensor)
                         and torch._C._functorch.is_functorch_wrapped_tensor(mask)):
            return None
        level, name = _outer_call()
        if level == 0:  # the user's own forward, not an attribution
            return None
        self.seen += 1
        masked = isinstance(mask, Tensor) and mask.ndim == 2
        real = mask != 0 if masked else None
        # no mask, or a mask of ones (a one-row probe, an unpadded batch), says nothing of the
        # side: up to _LOOKS library forwards are read for one with padding, then the hook goes
        if self.seen < _LOOKS and (not masked or (kwargs.get("position_ids") is None
                                                  and bool(real.all()))):
            return None
        self.done = True
        if self.handle is not None:
            self.handle.remove()
        _WATCHED.discard(mod)
        if not masked or kwargs.get("position_ids") is not None:
            return None
        if bool((~real[:, 0] & real.any(1)).any()):
            warnings.warn(
                f"{name}(...): the batch is left-padded (attention_mask is 0 in its first "
                "column) and has no position_ids, and the model adds absolute position "
                "embeddings: each example's tokens take positions shifted by its pad count, so "
                "its scores are not those of the example unpadded. Pass position_ids counted "
                "from the first real token, (attention_mask.cumsum(1) - 1).clamp(min=0), or pad "
                "on the right.", stacklevel=level)
        return None


def _encoder_prefix(module) -> str | None:
    """``"<name>."`` of a Hugging Face encoder-decoder's encoder, ``""`` where it has none to
    find, None for a model that is no encoder-decoder."""
    if module is None or not getattr(getattr(module, "config", None), "is_encoder_decoder",
                                     False):
        return None
    get = getattr(module, "get_encoder", None)
    enc = get() if callable(get) else None
    found = [n for n, m in module.named_modules() if m is enc and n] if enc is not None else []
    return found[0] + "." if found else ""


def _cross_role(layer: str) -> str | None:
    """``"kv"`` / ``"q"`` for a cross-attention block's key-value / query or output layer,
    ``"?"`` for another layer inside one, None outside."""
    parts = layer.split(".")
    if not any(p in _CROSS_BLOCKS for p in parts[:-1]):
        return None
    return "kv" if parts[-1] in _CROSS_KV else "q" if parts[-1] in _CROSS_Q_OUT else "?"


class Positions:
    """The real positions of the batch a statistics pass is in, as each layer reads them.

    ``start(batch)`` at every batch; ``take(layer, a)`` for each ``a`` ``[b, ..., d]`` a layer
    gets from it, in order (a batch taken ``chunk_size`` rows at a time: its rows in chunks),
    returns the ``[b, T]`` mask of those rows, or None where nothing is masked: a batch without
    padding, a layer input with one position per example (``[b, d]``, ``[b, 1, d]``), or
    positions that do not align with the mask's ``T`` (warned once per layer, naming it; the
    layer's statistic then includes the pad positions). ``parts``: the widths of position
    blocks concatenated along dim 1 that each repeat the mask (a tied weight's two uses).

    Which mask a layer takes is decided by more than its width. ``module`` a Hugging Face
    encoder-decoder (``config.is_encoder_decoder``): the layers under ``get_encoder()`` and the
    cross-attention key/value projections (they read the encoder's states) take
    ``attention_mask``; the other layers read the decoder's positions and take
    ``decoder_attention_mask``, or, in a batch without one, stay unmasked (warned). Any model:
    a batch holding another ``[B, T]`` tensor of the mask's width that need not describe its
    positions (``decoder_input_ids``, a second tower's ids) masks nothing (warned), as does a
    decoder layer, tied group or cross-attention layer whose positions cannot be told.
    """

    def __init__(self, func: str, module=None):
        self.func, self.real, self.dec, self.other = func, None, None, ()
        self.decoder_key = self.padded = False
        self.encoder = _encoder_prefix(module)
        self.offsets: dict[str, int] = {}
        self.warned: set[str] = set()

    def start(self, batch) -> None:
        self.real = padding_mask(batch)
        self.offsets.clear()
        self.dec, self.other, self.decoder_key = None, (), False
        if self.encoder is None and self.real is None:
            return  # nothing masked: the unpadded path, no more reads of the batch
        if self.encoder is not None:
            self.decoder_key = isinstance(batch, Mapping) and "decoder_attention_mask" in batch
            self.dec = padding_mask({"attention_mask": batch.get("decoder_attention_mask")}) \
                if self.decoder_key else None
            self.padded = self.real is not None or self.dec is not None or _ignored(batch)
        if self.real is not None:
            B, T = self.real.shape
            skip = _SAME_POSITIONS.union(_DECODER_KEYS if self.encoder is not None else ())
            self.other = tuple(sorted(
                str(k) for k, v in batch.items() if k not in skip and _sequence_key(k)
                and isinstance(v, Tensor) and v.ndim >= 2 and v.shape[:2] == (B, T)))

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            level, name = _user_call()
            via = "" if name.replace("(...)", "") == self.func else f" ({self.func})"
            warnings.warn(f"{name}{via}: {text}", stacklevel=level)

    def _mask_of(self, layer: str, grouped: bool) -> tuple[Tensor | None, str]:
        """The mask whose positions ``layer`` reads and its key (None: unmasked, warned where
        it matters)."""
        key = "attention_mask"
        if self.encoder is None:
            real = self.real
        elif not self.padded:
            return None, key
        elif not self.encoder or grouped or _cross_role(layer) == "?":
            what = ("a tied weight's uses (they may read encoder and decoder positions)"
                    if grouped else "positions this encoder-decoder does not tell (encoder or "
                    "decoder)")
            self._warn_once(layer, f"layer {layer!r} reads {what}: its input statistic "
                            "includes the padding positions. Leave it out of params, or accept "
                            "that its A counts pads.")
            return None, key
        elif layer.startswith(self.encoder) or _cross_role(layer) == "kv":
            real = self.real
        elif not self.decoder_key:
            self._warn_once("\0decoder", f"the decoder's layers (first: {layer!r}) read the "
                            "decoder's positions and the batch has no decoder_attention_mask: "
                            "their input statistics include the target padding (the encoder's "
                            "attention_mask does not describe them). Pass decoder_attention_mask "
                            "(zero at target pads) in the batch.")
            return None, key
        else:
            real, key = self.dec, "decoder_attention_mask"
        if real is not None and key == "attention_mask" and self.other:
            self._warn_once("\0other", f"the batch holds {list(self.other)} of the "
                            f"attention_mask's width {real.shape[1]}: a layer that reads those "
                            "positions would take a mask that does not describe them, so no "
                            "layer is masked and the input statistics include the padding. Pad "
                            "that sequence to another width, or give the model one sequence per "
                            "batch.")
            return None, key
        return real, key

    def take(self, layer: str, a: Tensor, parts: tuple[int, ...] | None = None) -> Tensor | None:
        if self.real is None and self.encoder is None:
            return None
        b = a.shape[0]
        at = self.offsets.get(layer, 0)
        self.offsets[layer] = at + b
        full, key = self._mask_of(layer, parts is not None)
        if full is None:
            return None
        width = math.prod(a.shape[1:-1])
        real = full[at:at + b]
        T = real.shape[1]
        if width == 1 and T != 1:  # one position per example (a pooled head): nothing to mask
            return None
        if real.shape[0] == b and parts is not None and all(p == T for p in parts) \
                and sum(parts) == width:
            return real.repeat(1, len(parts))
        if real.shape[0] == b and width == T and parts is None:
            return real
        self._warn_once(layer, f"layer {layer!r} reads {width} positions per example where the "
                        f"batch's {key} has {T}: its input statistic includes "
                        "the padding positions (it depends on how much padding the batch has). "
                        "Leave it out of params, or accept that its A counts pads.")
        return None


def _sequence_key(k) -> bool:
    """Whether a batch key names a token sequence of its own (``decoder_input_ids``,
    ``query_ids``, ``doc_attention_mask``, ``passage_inputs_embeds``)."""
    return isinstance(k, str) and (k.startswith("decoder_") or k.endswith(("_ids", "_mask",
                                                                            "_embeds")))


def _ignored(batch) -> bool:
    """Whether a Mapping batch's ``labels`` ignore some position (-100): a padded target."""
    y = batch.get("labels") if isinstance(batch, Mapping) else None
    return isinstance(y, Tensor) and not y.is_floating_point() and bool((y == -100).any())
