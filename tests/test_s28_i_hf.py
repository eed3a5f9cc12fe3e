"""Review RU5 (stop 28): gradient checkpointing (M1), frozen parameters (M2), left padding with
absolute positions (L1). Hugging Face models are tiny local configs (no downloads); their tests
skip without transformers, the rest run on plain modules."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn._blame import blame_data, dtype_error
from dattri_fn.attribute import grad_dot, influence
from dattri_fn.model import default_unpack

DT = torch.float64
_IDS = torch.randint(1, 40, (6, 7), generator=torch.Generator().manual_seed(3))


def _lm_loss(out, labels):
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100)


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=12,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to(DT).eval()


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(DT).eval()


def _batch(rows, side="right", position_ids=False, lens=(7, 4, 6, 3, 5, 7)):
    T = _IDS.shape[1]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask, lab, pos = torch.zeros_like(ids), torch.full_like(ids, -100), torch.zeros_like(ids)
    for j, r in enumerate(rows):
        n = lens[r]
        at = slice(0, n) if side == "right" else slice(T - n, T)
        ids[j, at], mask[j, at], lab[j, at], pos[j, at] = _IDS[r, :n], 1, _IDS[r, :n], \
            torch.arange(n)
        lab[j, at.start] = -100  # the first real token is predicted by no real one
    b = {"input_ids": ids, "attention_mask": mask, "labels": lab}
    if position_ids:
        b["position_ids"] = pos
    return b


def _scores(fm):
    tr, te = _batch([0, 1, 2, 3]), _batch([4, 5])
    return grad_dot(fm).score(fm.params, (), tr, te)


# --- M1: gradient checkpointing -------------------------------------------------------------

def test_checkpointing_hook_named_under_a_transform_only():
    # RI MED-2: the hook is taken by functional_model and the capture paths (exact in eval mode);
    # under vmap torch's raw requires_grad_() error is named (mutation: no require_grads_error)
    m, ref = _llama(), _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of the old name
        m.gradient_checkpointing_enable()
    m.eval()
    fm = functional_model(m, _lm_loss)
    assert torch.equal(_scores(fm), _scores(functional_model(ref, _lm_loss)))
    tr, te = _batch([0, 1, 2, 3]), _batch([4, 5])
    with pytest.raises(ValueError, match=r"^functional_model\(module=\.\.\.\): expected a module "
                       r"torch.func can differentiate per example.*got the input-require-grads "
                       r"forward hook on 'model.embed_tokens'.*activation_checkpointing_disable"
                       r".*gradient_checkpointing_disable.*disable_input_require_grads\(\)"):
        grad_dot(fm.loss).score(fm.params, (), tr, te)


def test_checkpointing_enabled_after_functional_model_refused_at_construction():
    # mutation: check_checkpointing out of check_eval_module / check_eval -> these construct
    # and fail later (training-mode checkpointing; the eval-mode hook is RI MED-2's)
    m = _llama()
    fm = functional_model(m, _lm_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.gradient_checkpointing_enable()
    m.disable_input_require_grads()
    m.train()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()
    with pytest.raises(ValueError, match=r"^grad_dot\(loss=\.\.\.\): expected a module torch.func"):
        grad_dot(fm)
    with pytest.raises(ValueError, match=r"^influence\(loss=\.\.\.\): expected a module torch"):
        influence(fm.loss, solver="cg", damping=0.1)
    with pytest.raises(ValueError, match=r"^influence\(loss=\.\.\.\): expected a module torch"):
        influence(fm, solver="ekfac", damping=0.1)


def test_checkpointing_in_training_mode_refused_in_eval_mode_exact():
    m, ref = _llama(), _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.gradient_checkpointing_enable()
    m.disable_input_require_grads()
    m.train()  # the hook is gone: the checkpoint itself is refused (mutation: flag check out)
    with pytest.raises(ValueError, match=r"^functional_model\(module=\.\.\.\): .* got gradient "
                       r"checkpointing at 'model' in training mode"):
        functional_model(m, _lm_loss)
    m.eval()  # HF does not checkpoint in eval mode: it runs, exactly (mutation: mode ignored)
    assert torch.equal(_scores(functional_model(m, _lm_loss)),
                       _scores(functional_model(ref, _lm_loss)))


_CHECKPOINT_TEXT = (
    "torch.utils.checkpoint: Recomputed values for the following tensors have different metadata "
    "than during the forward pass.\ntensor at position 4:\nsaved metadata: {'shape': "
    "torch.Size([1, 7, 8]), 'dtype': torch.float64, 'device': device(type='cpu')}\nrecomputed "
    "metadata: {'shape': torch.Size([1, 7, 8]), 'dtype': torch.float64, 'device': cpu}")


def test_dtype_blame_needs_a_mismatch_phrase():
    # mutation: the old pattern (the bare word "dtype") -> the first two are blamed on the data
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert dtype_error("grad_dot", "train", batch, RuntimeError(_CHECKPOINT_TEXT)) is None
    assert dtype_error("grad_dot", "train", batch,
                       RuntimeError("op failed on a tensor of dtype=torch.float32")) is None
    for text in ("mat1 and mat2 must have the same dtype, but got Double and Float",
                 "Input type (long int) and bias type (float) should be the same",
                 "expected scalar type Double but found Float",
                 "mixed dtype (CPU): all inputs must share same datatype.",
                 "expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float",
                 "Expected tensor for argument #1 'indices' to have one of the following scalar "
                 "types: Long, Int; but got torch.FloatTensor instead",
                 "result type Float can't be cast to the desired output type Long"):
        err = dtype_error("grad_dot", "train", batch, RuntimeError(text))
        assert isinstance(err, TypeError) and str(err).startswith("grad_dot(train=...)"), text
        assert "data of" in str(err), text
    # RI MED-3: an index's dtype is the labels', never the data's (mutation: _INDEX_DTYPE out)
    for text in ("gather(): Expected dtype int32/int64 for index",
                 "gather(): Expected dtype int64 for index",
                 "index_select(): Expected dtype int32 or int64 for index"):
        err = dtype_error("grad_dot", "train", batch, RuntimeError(text))
        assert str(err).startswith("grad_dot(train=...): expected integer class labels or "
                                   "indices (torch.int64), got an index of another dtype"
                                   ) and "data of" not in str(err), text


def test_checkpoint_error_passes_blame_data_unchanged():
    # mutation: torch.utils.checkpoint out of _TRANSFORM_LIMIT -> a ValueError on the data
    with pytest.raises(RuntimeError, match=r"^torch\.utils\.checkpoint: Recomputed"):
        with blame_data("grad_dot", "train", {"x": torch.ones(2, 3)}):
            raise RuntimeError(_CHECKPOINT_TEXT)


# --- M2: frozen parameters --------------------------------------------------------------------

class _Adapted(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.lora_A, self.lora_B = nn.Linear(4, 2, bias=False), nn.Linear(2, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x) + self.lora_B(self.lora_A(x))))


def _adapted(freeze=True):
    torch.manual_seed(1)
    m = _Adapted().to(DT)
    if freeze:
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    return m


def test_frozen_parameters_warned_once_at_the_user_line():
    # mutation: the warning out -> no record
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fm = functional_model(_adapted(), F.cross_entropy)
    msgs = [w for w in rec if "requires_grad=False" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].filename == __file__, [str(w.message) for w in rec]
    assert str(msgs[0].message).startswith("functional_model(params=None): 4 of 6 parameter "
                                           "tensors have requires_grad=False (first: 'base.weight')")
    assert list(fm.params) == [n for n, _ in _adapted().named_parameters()]  # default kept


@pytest.mark.parametrize("case", ["selected", "all_trainable", "all_frozen"])
def test_frozen_parameters_no_warning(case):
    m = _adapted(freeze=case == "selected")
    if case == "all_frozen":
        m.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = [n for n, p in m.named_parameters() if p.requires_grad] if case == "selected" \
            else None
        fm = functional_model(m, F.cross_entropy, params=sel)
    if case == "selected":  # the warning's remedy is the adapters' selection
        other = functional_model(m, F.cross_entropy, params=lambda n: "lora_" in n)
        x, y = torch.randn(5, 4, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
        assert list(fm.params) == ["lora_A.weight", "lora_B.weight"]
        assert torch.equal(grad_dot(fm).score(fm.params, (), (x, y), (x, y)),
                           grad_dot(other).score(other.params, (), (x, y), (x, y)))


# --- L1: left padding without position_ids ----------------------------------------------------

def _left_pad_warnings(fm, batch, calls=2, side="right", position_ids=False):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(calls):
            # one tokenizer pads every batch on one side: the first padded one decides
            grad_dot(fm).score(fm.params, (), batch, _batch([4, 5], side, position_ids))
    return [w for w in rec if "left-padded" in str(w.message)]


def test_left_padding_without_position_ids_warned_once_gpt2():
    # mutation: functional_model's LeftPadCheck out -> no warning (scores 72% off, review RU5)
    fm = functional_model(_gpt2(), _lm_loss)
    got = _left_pad_warnings(fm, _batch([0, 1, 2, 3], "left"), side="left")
    assert len(got) == 1 and got[0].filename == __file__
    assert "position_ids" in str(got[0].message) and "absolute position" in str(got[0].message)


@pytest.mark.parametrize("case", ["right", "left_with_position_ids", "llama_left"])
def test_left_padding_not_warned(case):
    fm = functional_model(_llama() if case == "llama_left" else _gpt2(), _lm_loss)
    batch = _batch([0, 1, 2, 3], "right" if case == "right" else "left",
                   position_ids=case == "left_with_position_ids")
    assert not _left_pad_warnings(fm, batch, calls=1, side="right" if case == "right" else "left",
                                  position_ids=case == "left_with_position_ids")


class _Absolute(nn.Module):
    """A plain module with GPT-2's position table name (no transformers needed)."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe, self.out = nn.Embedding(40, 4), nn.Embedding(8, 4), nn.Linear(4, 40)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        pos = torch.arange(input_ids.shape[1]) if position_ids is None else position_ids
        h = self.wte(input_ids) + self.wpe(pos)
        return self.out(h * attention_mask[..., None])


def test_left_pad_check_only_on_absolute_models_and_real_left_padding():
    fm = functional_model(_Absolute().to(DT), _lm_loss)
    assert fm.unpack is default_unpack  # RI MED-1: the fast paths' test sees the same object
    right = _batch([0, 1, 2, 3], "right")
    right["attention_mask"][1] = 0  # an empty row is not left padding (mutation: any(1) out)
    right["input_ids"][1], right["labels"][1] = 0, -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_dot(fm).score(fm.params, (), right, _batch([4, 5]))
    fm = functional_model(_Absolute().to(DT), _lm_loss)
    # RI LOW-3: the public call by name (mutation: the closure's name unread -> _gradient_simil...)
    with pytest.warns(UserWarning, match=r"^grad_dot\(\.\.\.\)\.score\(\.\.\.\): the batch is left"):
        grad_dot(fm).score(fm.params, (), _batch([0, 1, 2, 3], "left"), _batch([4, 5], "left"))


def test_plain_loss_of_a_model_that_started_checkpointing_later_is_refused_at_construction():
    m = _llama()
    fm = functional_model(m, _lm_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.gradient_checkpointing_enable()
    m.disable_input_require_grads()
    m.train()
    with pytest.raises(ValueError, match=r"^grad_dot\(loss=\.\.\.\): expected a module torch.func"):
        grad_dot(fm.loss)


def test_a_watched_model_still_pickles_and_its_loaded_copy_does_not_watch():
    """The left-padding hook is an object, not a closure: torch.save(model) works (it failed
    with "Can't pickle local object" when the hook was a closure)."""
    import io

    m = _gpt2()
    functional_model(m, _lm_loss)
    assert len(m._forward_pre_hooks) == 1
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert all(h.done for h in loaded._forward_pre_hooks.values())
