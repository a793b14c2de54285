"""HF transformers models, built from small configs (nothing downloaded), with blocks chosen by class name.

Three architectures: Llama (decoder, rotary, GQA), GPT-2 (decoder, Conv1D, tied embeddings) and BERT
(encoder, attention mask, MLM head). Skipped when transformers is not installed.
"""

from __future__ import annotations

import collections
import copy
import json
import warnings
from collections.abc import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ckpt_wrapper import ActivationWrapper, CheckpointWrapper, apply_activation_checkpointing, by_class_name, remove_activation_checkpointing  # noqa: E402

pytestmark = pytest.mark.timeout(120)

VOCAB = 96


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attention_dropout=0.1)
    return transformers.LlamaForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)  # dropout 0.1 by default
    return transformers.GPT2LMHeadModel(config)


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)  # dropout 0.1 by default
    return transformers.BertForMaskedLM(config)


# (builder, block class name, wrapped block names)
MODELS = {
    "llama": (_llama, "LlamaDecoderLayer", ["model.layers.0", "model.layers.1"]),
    "gpt2": (_gpt2, "GPT2Block", ["transformer.h.0", "transformer.h.1"]),
    "bert": (_bert, "BertLayer", ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    model.config.use_cache = False  # training: no KV cache (see docs/transformers.md)
    return model.train()


def _step(model: torch.nn.Module, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (2, 24), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, 18:] = 0  # padding in the second row: the attention mask reaches every block
    torch.manual_seed(seed)  # the dropout stream
    loss = model(input_ids=tokens, attention_mask=mask, labels=tokens).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_by_class_name_give_the_unwrapped_gradients(name: str, assert_same_grads: Callable[..., None]) -> None:
    """Checkpointing an HF model's layers, chosen by class name, changes no loss, gradient or name (dropout on).

    A failure means recompute diverges on a real HF layer (its keyword arguments, attention mask, rotary
    embeddings, tuple outputs or dropout) or the wrapping renamed something HF relies on.
    """
    reference = _build(name)
    model = copy.deepcopy(reference)
    keys = list(model.state_dict())
    block_class = MODELS[name][1]
    wrapped = apply_activation_checkpointing(model, check_fn=by_class_name(block_class))
    assert wrapped == MODELS[name][2]
    assert list(model.state_dict()) == keys
    block = model.get_submodule(wrapped[0])
    assert isinstance(block, CheckpointWrapper) and type(block).__name__ == block_class

    loss = _step(model)
    expected = _step(reference)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert_same_grads(model, reference, exact=True)


def test_every_block_really_recomputes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wrapped LlamaDecoderLayer runs its MLP twice per step (forward, then recompute).

    A failure means HF's own forward machinery (``GradientCheckpointingLayer`` wraps ``forward`` of every
    subclass, ours included) bypassed the checkpoint: no memory would be saved.
    """
    calls: collections.Counter = collections.Counter()
    mlp = transformers.models.llama.modeling_llama.LlamaMLP
    original = mlp.forward

    def counting(self: torch.nn.Module, *args: object) -> object:
        calls[id(self)] += 1
        return original(self, *args)

    monkeypatch.setattr(mlp, "forward", counting)
    model = _build("llama")
    apply_activation_checkpointing(model, check_fn=by_class_name("LlamaDecoderLayer"))
    _step(model)
    assert sorted(calls.values()) == [2, 2]


@pytest.mark.parametrize("name", list(MODELS))
def test_save_pretrained_round_trips_into_a_model_never_wrapped(name: str, tmp_path) -> None:
    """A wrapped model's ``save_pretrained`` loads with ``from_pretrained`` into the plain class, and back.

    The files are those an unwrapped model writes (same tensor names, same config keys); the loaded model
    has no wrapper anywhere and equal weights; a plain model's weights load strictly into a wrapped one.
    A failure means a checkpoint written with checkpointing on cannot be used without it, or vice versa.
    """
    from safetensors.torch import load_file

    model = _build(name)
    plain = copy.deepcopy(model)
    apply_activation_checkpointing(model, check_fn=by_class_name(MODELS[name][1]))
    _step(model)
    with torch.no_grad():  # move the weights away from the initialisation, so the round trip is not vacuous
        for param in model.parameters():
            param.sub_(0.1 * param.grad if param.grad is not None else 0)

    model.save_pretrained(tmp_path / "wrapped")
    plain.save_pretrained(tmp_path / "plain")
    assert sorted(load_file(tmp_path / "wrapped" / "model.safetensors")) == sorted(
        load_file(tmp_path / "plain" / "model.safetensors"))
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("wrapped", "plain")]
    assert sorted(configs[0]) == sorted(configs[1])

    loaded = type(plain).from_pretrained(tmp_path / "wrapped")
    assert not any(isinstance(m, ActivationWrapper) for m in loaded.modules())
    assert type(loaded.get_submodule(MODELS[name][2][0])).__name__ == MODELS[name][1]
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")

    model.load_state_dict(plain.state_dict(), strict=True)  # and the other way: plain weights, wrapped model


def _enable_hf_checkpointing(model: torch.nn.Module, how: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in 5.x
        getattr(model, how)()


HF_ENABLE = [how for how in ("gradient_checkpointing_enable", "activation_checkpointing_enable")
             if hasattr(transformers.PreTrainedModel, how)]


@pytest.mark.parametrize("how", HF_ENABLE)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_model_with_hf_checkpointing_enabled_is_refused(name: str, how: str) -> None:
    """``apply_activation_checkpointing`` on a model after ``model.gradient_checkpointing_enable()`` raises.

    The message says how to turn HF's off. A failure means every block would silently be recomputed twice.
    """
    model = _build(name)
    _enable_hf_checkpointing(model, how)
    with pytest.raises(ValueError, match="already checkpoints its layers itself") as raised:
        apply_activation_checkpointing(model, check_fn=by_class_name(MODELS[name][1]))
    assert "gradient_checkpointing_disable" in str(raised.value)
    assert not any(isinstance(m, ActivationWrapper) for m in model.modules()), "refused, yet blocks were wrapped"


def test_hf_checkpointing_enabled_after_wrapping_does_not_recompute_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enabling HF's checkpointing on an already wrapped Llama still runs each MLP twice per step, not three times.

    torch nests the two non-reentrant checkpoints (HF's around ours) without a second recompute. A failure
    means that order now costs a second recompute; ckpt_wrapper would have to refuse it at call time.
    """
    calls: collections.Counter = collections.Counter()
    mlp = transformers.models.llama.modeling_llama.LlamaMLP
    original = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda self, *a: (calls.update([id(self)]), original(self, *a))[1])
    model = _build("llama")
    apply_activation_checkpointing(model, check_fn=by_class_name("LlamaDecoderLayer"))
    _enable_hf_checkpointing(model, HF_ENABLE[-1])
    _step(model)
    assert sorted(calls.values()) == [2, 2]


def test_training_with_use_cache_off_builds_no_cache() -> None:
    """With ``config.use_cache = False`` (what docs/transformers.md asks for), a training step keeps no KV cache.

    With the cache on, HF layers append to it in forward and again in the recompute (HF's own
    checkpointing switches it off for that reason). A failure means the advice no longer works.
    """
    model = _build("llama")
    apply_activation_checkpointing(model, check_fn=by_class_name("LlamaDecoderLayer"))
    tokens = torch.randint(0, VOCAB, (2, 16))
    out = model(input_ids=tokens, labels=tokens)
    assert out.past_key_values is None


@pytest.mark.parametrize("mode_at_wrap", ["eval", "train"])
def test_a_model_loaded_in_eval_mode_never_returns_a_kv_cache_in_training(tmp_path, mode_at_wrap: str) -> None:
    """A Llama saved and loaded back (``from_pretrained`` gives an eval-mode model with
    ``use_cache=True``), wrapped, then put in ``.train()``: its training forward builds no KV cache (a
    recompute would add to it again), with a warning that says what to set; eval forwards keep the
    cache, and removing checkpointing removes the guard.

    Caught on the main of 2026-12-01: the warning fired only for models already training at wrap
    time, and the model returned a cache grown twice per layer, silently.
    """
    saved = _build("llama")
    saved.config.use_cache = True  # HF's default, which a loaded model has
    saved.save_pretrained(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert model.config.use_cache is True and not model.training
    getattr(model, mode_at_wrap)()
    apply_activation_checkpointing(model, check_fn=by_class_name("LlamaDecoderLayer"))
    model.train()
    tokens = torch.randint(0, VOCAB, (2, 16))
    with pytest.warns(UserWarning, match="sets use_cache=False"):
        out = model(input_ids=tokens, labels=tokens)
    assert out.past_key_values is None
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        assert model(input_ids=tokens).past_key_values is not None  # generation keeps its cache
    remove_activation_checkpointing(model)
    assert not model._forward_pre_hooks
