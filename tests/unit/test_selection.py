"""Contract 3, exact selection: exactly the matched modules are wrapped, never the root, never twice.

Each test checks the returned names *and* the wrapped state of every module in the model, so that a
selector that wraps one module too many (or reports one it did not wrap) fails.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, transformer_auto_wrap_policy

from ckpt_wrapper import (
    ActivationWrapper,
    CheckpointWrapper,
    apply_activation_checkpointing,
    by_class,
    by_class_name,
    by_name,
    checkpoint_wrapper,
    every_nth,
)
from ckpt_wrapper.testing.models import GPT, Block

BLOCKS = [f"layers.{i}" for i in range(4)]


def _wrapped_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, ActivationWrapper)]


def _assert_exactly_wrapped(model: nn.Module, returned: list[str], expected: list[str]) -> None:
    assert returned == expected
    for name, module in model.named_modules():
        assert isinstance(module, CheckpointWrapper) == (name in expected), f"module '{name}' wrongly (un)wrapped"


def test_exactly_the_selected_blocks_are_wrapped(make_gpt) -> None:
    """``by_class(Block)`` wraps the four blocks and nothing else; the returned names say so.

    A failure means wrapping touched modules the user did not select, or reported names that differ
    from what it did.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model, check_fn=by_class(Block))
    _assert_exactly_wrapped(model, returned, BLOCKS)


def test_root_is_never_wrapped_even_when_it_matches() -> None:
    """A ``check_fn`` that matches the root wraps only its matching descendants.

    A failure means the whole model became one checkpoint (recompute of everything, no savings), or
    the root's class changed under the user's feet.
    """
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), nn.Sequential(nn.Linear(2, 2)))
    returned = apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Sequential))
    _assert_exactly_wrapped(model, returned, ["0", "1"])
    assert type(model) is nn.Sequential


def test_match_everything_wraps_neither_the_root_nor_anything_nested(make_gpt) -> None:
    """The default ``check_fn`` (match everything) never wraps the root and never wraps inside a wrapper.

    A failure means the default selection checkpoints the whole model as one region, or nests
    wrappers so that inner modules are recomputed more than once.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model)

    assert returned and returned == _wrapped_names(model)
    assert not isinstance(model, ActivationWrapper)
    for name in returned:
        assert not any(name.startswith(f"{outer}.") for outer in returned), f"'{name}' is inside another wrapper"


def test_nested_matches_wrap_only_the_outermost(make_gpt) -> None:
    """A ``check_fn`` matching both Block and nn.Linear wraps the Blocks and the head, no Linear inside a Block.

    A failure means nested checkpoints: every Linear inside a block would be recomputed twice.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, (Block, nn.Linear)))
    _assert_exactly_wrapped(model, returned, [*BLOCKS, "head"])


def test_second_call_wraps_nothing_and_returns_empty(make_gpt, batch, block_forward_calls) -> None:
    """Applying the same selection twice returns ``[]`` and leaves every block wrapped once.

    A failure means a repeated call (common in frameworks that apply AC defensively) double-wraps
    blocks and recomputes them twice.
    """
    model = make_gpt()
    apply_activation_checkpointing(model, check_fn=by_class(Block))

    assert apply_activation_checkpointing(model, check_fn=by_class(Block)) == []
    assert apply_activation_checkpointing(model, check_fn=by_class_name("Block")) == []

    assert _wrapped_names(model) == BLOCKS
    model.loss(*batch).backward()
    assert [block_forward_calls[id(b)] for b in model.layers] == [2] * 4, "a block recomputed more than once"


def test_wrapping_a_wrapped_block_directly_raises(make_gpt) -> None:
    """``checkpoint_wrapper`` on an already wrapped block raises ``ValueError`` that says how to rewrap.

    A failure means a block can be checkpointed twice by calling the wrapper by hand.
    """
    block = checkpoint_wrapper(make_gpt().layers[0])
    with pytest.raises(ValueError, match="already wrapped.*unwrap"):
        checkpoint_wrapper(block)


@pytest.mark.parametrize(
    "check_fn",
    [by_class(nn.Conv2d), lambda m: False, by_name("blocks.*")],
    ids=["by_class", "lambda", "by_name"],
)
def test_selection_matching_nothing_raises_listing_the_classes_seen(make_gpt, check_fn) -> None:
    """A selection that matches nothing raises ``ValueError`` naming the classes the model does contain.

    A failure means a typo in a class name silently trains without checkpointing (and then OOMs), or
    the error gives no way to fix it.
    """
    model = make_gpt()
    with pytest.raises(ValueError, match="matched no module") as info:
        apply_activation_checkpointing(model, check_fn=check_fn)
    message = str(info.value)
    for class_name in ("Block", "CausalSelfAttention", "Embedding", "LayerNorm", "Linear", "MLP", "ModuleList"):
        assert class_name in message
    assert _wrapped_names(model) == []


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("Block",), BLOCKS),
        (("Block,Embedding",), ["tok_emb", "pos_emb", *BLOCKS]),
        (("Embedding", " LayerNorm , Block"), ["tok_emb", "pos_emb", *BLOCKS, "ln_f"]),
        (("ckpt_wrapper.testing.models.Block",), BLOCKS),
        (("torch.nn.modules.linear.Linear",), [
            *(f"layers.{i}.{sub}" for i in range(4) for sub in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")),
            "head",
        ]),
    ],
    ids=["plain", "comma", "several-args", "dotted-path", "dotted-torch-class"],
)
def test_by_class_name_matches_plain_comma_separated_and_dotted_names(make_gpt, names, expected) -> None:
    """``by_class_name`` accepts plain names, comma-separated lists and full dotted import paths.

    A failure means names copied from HF/accelerate configs (``"LlamaDecoderLayer"``,
    ``"a,b"``, ``"pkg.mod.Class"``) do not select what they say.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model, check_fn=by_class_name(*names))
    _assert_exactly_wrapped(model, returned, expected)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("layers.*", BLOCKS),
        ("layers.[13]", ["layers.1", "layers.3"]),
        (re.compile(r"layers\.(0|2)"), ["layers.0", "layers.2"]),
        (re.compile(r"layers\.\d\.mlp"), [f"layers.{i}.mlp" for i in range(4)]),
    ],
    ids=["glob-star", "glob-set", "regex", "regex-nested"],
)
def test_by_name_matches_globs_and_compiled_regexes(make_gpt, pattern, expected) -> None:
    """``by_name`` matches fully qualified names by glob, and by compiled regex (full match).

    A failure means name-based selection (``"layers.*"``) wraps the wrong modules or nests them.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model, check_fn=by_name(pattern))
    _assert_exactly_wrapped(model, returned, expected)


@pytest.mark.parametrize(
    ("n", "offset", "expected"),
    [(1, 0, BLOCKS), (2, 0, ["layers.0", "layers.2"]), (2, 1, ["layers.1", "layers.3"]), (3, 2, ["layers.2"])],
)
def test_every_nth_selects_every_nth_match_from_offset(make_gpt, n, offset, expected) -> None:
    """``every_nth(n, of, offset=k)`` wraps matches k, k+n, k+2n, ... in module order.

    A failure means partial checkpointing (the usual memory/speed trade-off) checkpoints the wrong blocks.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model, check_fn=every_nth(n, by_class(Block), offset=offset))
    _assert_exactly_wrapped(model, returned, expected)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (by_name("layers.0") | by_name("head"), ["layers.0", "head"]),
        (by_class(Block) & by_name("layers.[23]"), ["layers.2", "layers.3"]),
        (by_name("layers.0") | by_class(nn.LayerNorm), ["layers.0", *(f"layers.{i}.ln_{j}" for i in (1, 2, 3) for j in (1, 2)), "ln_f"]),
    ],
    ids=["or", "and", "or-outermost"],
)
def test_selectors_combine_with_or_and_and(make_gpt, selector, expected) -> None:
    """``a | b`` selects modules either matches; ``a & b`` those both match; outermost-first still holds.

    A failure means combined selectors pick a different set than their parts imply.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model, check_fn=selector)
    _assert_exactly_wrapped(model, returned, expected)


@pytest.mark.parametrize(
    "policy",
    [functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block}), ModuleWrapPolicy({Block})],
    ids=["transformer_auto_wrap_policy", "ModuleWrapPolicy"],
)
def test_fsdp_auto_wrap_policies_select_blocks(make_gpt, policy) -> None:
    """FSDP auto-wrap policies (callable and ``_Policy`` object) select the blocks, overriding ``check_fn``.

    A failure means configs that reuse the FSDP wrap policy for AC (accelerate, many training
    scripts) wrap something else, or that ``auto_wrap_policy`` does not take precedence.
    """
    model = make_gpt()
    returned = apply_activation_checkpointing(model, check_fn=by_class(nn.Linear), auto_wrap_policy=policy)
    _assert_exactly_wrapped(model, returned, BLOCKS)


def _apply(**kwargs):
    return lambda model: apply_activation_checkpointing(model, **kwargs)


@pytest.mark.parametrize(
    ("make_bad", "error", "message"),
    [
        (lambda model: every_nth(0, by_class(Block)), ValueError, r"n >= 1, got 0"),
        (lambda model: every_nth(2, by_class(Block), offset=2), ValueError, r"0 <= offset < n"),
        (lambda model: every_nth(2, lambda m: True), TypeError, r"selector"),
        (lambda model: by_class(int), TypeError, r"nn.Module subclasses.*int"),
        (lambda model: by_class(), TypeError, r"nn.Module subclasses"),
        (lambda model: by_class_name(" , "), ValueError, r"at least one class name"),
        (lambda model: by_class_name(Block), TypeError, r"expects strings"),
        (lambda model: by_name(), ValueError, r"at least one pattern"),
        (lambda model: by_class(Block) | (lambda m: True), TypeError, r"combine only with selectors"),
        (_apply(check_fn=42), TypeError, r"check_fn must be callable.*int"),
        (_apply(check_fn=by_class(Block), auto_wrap_policy=42), TypeError, r"auto_wrap_policy must be"),
        (lambda model: apply_activation_checkpointing(torch.zeros(1)), TypeError, r"nn.Module"),
        (lambda model: checkpoint_wrapper(model.layers[0], checkpoint_impl="sideways"), TypeError, r"NO_REENTRANT"),
        (lambda model: checkpoint_wrapper(model.layers[0], prserve_rng_state=False), TypeError, r"unknown checkpoint option.*prserve_rng_state"),
        (lambda model: checkpoint_wrapper(model.layers[0], use_reentrant=True), ValueError, r"contradicts"),
        (lambda model: checkpoint_wrapper(model.layers[0], checkpoint_fn=3), TypeError, r"checkpoint_fn must be callable"),
        (lambda model: checkpoint_wrapper("layer"), TypeError, r"nn.Module"),
    ],
    ids=[
        "every_nth-zero", "every_nth-offset", "every_nth-not-selector", "by_class-int", "by_class-empty",
        "by_class_name-empty", "by_class_name-class", "by_name-empty", "or-with-lambda", "check_fn-int",
        "policy-int", "model-not-module", "impl-unknown", "option-typo", "use_reentrant-contradiction",
        "checkpoint_fn-int", "wrap-not-module",
    ],
)
def test_bad_arguments_raise_helpful_errors(make_gpt, make_bad, error, message) -> None:
    """Bad selectors, policies and wrapper options raise TypeError/ValueError saying what was expected.

    A failure means a user mistake is silently ignored (an option typo, a zero stride) or surfaces as
    an unrelated error deep inside torch.
    """
    model = make_gpt()
    with pytest.raises(error, match=message):
        make_bad(model)
    assert _wrapped_names(model) == []


def test_selector_is_usable_as_plain_check_fn(make_gpt) -> None:
    """A class selector called as ``check_fn(module)`` answers like the equivalent ``isinstance`` test.

    A failure means selectors cannot be handed to code that expects a plain ``module -> bool``
    (PyTorch's own ``apply_activation_checkpointing``).
    """
    model = make_gpt()
    selector = by_class_name("Block") | by_class(nn.LayerNorm)
    for module in model.modules():
        assert selector(module) == isinstance(module, (Block, nn.LayerNorm))
    with pytest.raises(TypeError, match="fully qualified name"):
        by_name("layers.*")(model.layers[0])


def test_every_nth_applied_twice_adds_the_rest(make_gpt) -> None:
    """Wrapping every 2nd block, then all blocks, wraps only the blocks still unwrapped.

    A failure means a second, wider selection re-wraps or skips blocks.
    """
    model: GPT = make_gpt()
    assert apply_activation_checkpointing(model, check_fn=every_nth(2, by_class(Block))) == ["layers.0", "layers.2"]
    returned = apply_activation_checkpointing(model, check_fn=by_class(Block))
    assert returned == ["layers.1", "layers.3"]
    assert _wrapped_names(model) == BLOCKS


@pytest.mark.parametrize(
    "selector, missing",
    [
        (lambda: by_class_name("Block,MLPP"), "'MLPP'"),
        (lambda: by_class_name("Block", "Nope"), "'Nope'"),
        (lambda: by_name("layers.0", "layers.7"), "'layers.7'"),
        (lambda: by_class(Block, torch.nn.Conv2d), "'Conv2d'"),
        (lambda: every_nth(2, by_class_name("Block,MLPP")), "'MLPP'"),
    ],
)
def test_every_name_in_a_selector_list_must_match(make_gpt, selector, missing: str) -> None:
    """A list with one name that matches nothing is an error naming it and what did match; nothing is
    wrapped. Caught on the main of 2026-12-01: the misspelt name was ignored and its blocks stayed
    unwrapped without a word.
    """
    model = make_gpt()
    with pytest.raises(ValueError, match=f"{missing} matched no module.*did"):
        apply_activation_checkpointing(model, check_fn=selector())
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())
