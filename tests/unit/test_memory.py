"""It really saves memory, and pays for it with recompute: measured on CPU, as docs/benchmarks.md
("How figures are measured") says.

- bytes autograd saves (``SavedBytes``): exact for what reaches the outermost pack hook;
- bytes held after forward (glibc ``mallinfo2``): counts whatever keeps activations alive, but noisy,
  so the model is big enough for activations to dominate the noise;
- FLOPs of a step (``FlopCounterMode``): deterministic; recompute shows up as extra forward FLOPs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from ckpt_wrapper import apply_activation_checkpointing, by_class, every_nth
from ckpt_wrapper.measure import SavedBytes, held_after_forward, host_allocated_bytes, step_flops
from ckpt_wrapper.testing.models import GPT, Block, GPTConfig

# Wide and long enough that activations (about 17 MiB unwrapped) dwarf allocator noise.
MEASURED = GPTConfig(n_layer=8, d_model=128, n_head=4, seq_len=64, vocab_size=256)
BATCH = 4


@pytest.fixture(scope="module")
def measured_pair() -> tuple[GPT, GPT, torch.Tensor]:
    """(unwrapped, every-block-checkpointed) copies of an 8-block GPT and a batch of tokens."""
    torch.manual_seed(0)
    reference = GPT(MEASURED)
    wrapped = copy.deepcopy(reference)
    apply_activation_checkpointing(wrapped, check_fn=by_class(Block))
    tokens = torch.randint(0, MEASURED.vocab_size, (BATCH, MEASURED.seq_len), generator=torch.Generator().manual_seed(1))
    return reference, wrapped, tokens


def test_checkpointed_blocks_save_under_a_quarter_of_the_bytes(measured_pair) -> None:
    """With every block checkpointed, autograd saves (parameters excluded) < 1/4 of the unwrapped bytes.

    A failure means the blocks' activations are still saved for backward: checkpointing is not
    happening, or something inside the wrapper keeps them.
    """
    reference, wrapped, tokens = measured_pair
    saved = {}
    for name, model in (("reference", reference), ("wrapped", wrapped)):
        with SavedBytes(exclude=model.parameters()) as counter:
            out = model(tokens)
        del out
        saved[name] = counter.bytes

    assert saved["reference"] > 8 * BATCH * MEASURED.seq_len * MEASURED.d_model * 4, "test setup: too little saved"
    assert saved["wrapped"] < saved["reference"] / 4, saved


def test_checkpointed_model_holds_under_a_quarter_after_forward(measured_pair) -> None:
    """Allocator bytes left alive by forward (output excluded) are < 1/4 of the unwrapped model's.

    Unlike ``SavedBytes`` this sees every way activations can stay alive (caches, closures, inner
    hooks). A failure means memory is held by something other than autograd's saved tensors.
    """
    try:
        host_allocated_bytes()
    except RuntimeError as error:
        pytest.skip(f"needs glibc mallinfo2: {error}")
    reference, wrapped, tokens = measured_pair

    held_reference = held_after_forward(lambda: reference(tokens))
    held_wrapped = held_after_forward(lambda: wrapped(tokens))

    assert held_reference > 4 * 2**20, f"test setup: only {held_reference} bytes held unwrapped"
    assert held_wrapped < held_reference / 4, (held_wrapped, held_reference)


def _blocks_forward_flops(model: GPT, names: list[str], tokens: torch.Tensor) -> int:
    x = torch.randn(*tokens.shape, model.config.d_model, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        for name in names:
            model.get_submodule(name)(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("selection", ["all", "every_2nd"])
def test_recompute_costs_one_forward_of_the_wrapped_blocks(make_gpt, batch, selection) -> None:
    """A wrapped step's extra FLOPs equal the wrapped blocks' forward FLOPs (0.9x to 1.1x).

    Measured with PyTorch's early stop off, so recompute runs each block's whole forward. A failure
    above 1.1x means blocks are recomputed more than once (nested or double wrapping); below 0.9x
    means some selected block is not recomputed at all.
    """
    reference = make_gpt(n_layer=2)
    model = copy.deepcopy(reference)
    selector = by_class(Block) if selection == "all" else every_nth(2, by_class(Block))
    wrapped = apply_activation_checkpointing(model, check_fn=selector)
    blocks = _blocks_forward_flops(reference, wrapped, batch[0])

    with set_checkpoint_early_stop(False):
        extra = step_flops(lambda: model.loss(*batch).backward()) - step_flops(lambda: reference.loss(*batch).backward())

    assert blocks > 0
    assert 0.9 * blocks <= extra <= 1.1 * blocks, (extra, blocks)


def test_recompute_with_early_stop_costs_at_most_one_forward(make_gpt, batch) -> None:
    """With PyTorch's default early stop, recompute costs more than half and at most one blocks' forward.

    Early stop ends recompute after the last tensor backward needs, so the blocks' last matmul (the
    MLP output projection, a third of the counted FLOPs here) is skipped. A failure above 1x means
    recompute happened more than once; below 0.5x means most of the recompute went missing.
    """
    reference = make_gpt(n_layer=2)
    model = copy.deepcopy(reference)
    wrapped = apply_activation_checkpointing(model, check_fn=by_class(Block))
    blocks = _blocks_forward_flops(reference, wrapped, batch[0])

    extra = step_flops(lambda: model.loss(*batch).backward()) - step_flops(lambda: reference.loss(*batch).backward())

    assert 0.5 * blocks < extra <= blocks, (extra, blocks)
