"""Deterministic probes for recompute and memory, shared by the selective, recompute and planner tests.

- ``OpCounter``: a ``TorchDispatchMode`` counting every aten op that runs inside it. Entered around
  ``backward()`` only, and compared with the same count for the unwrapped model, the difference is
  exactly what was recomputed (``recomputed_ops``).
- ``live_bytes_after_forward``: bytes of every storage created during forward that is still alive once
  forward has returned (the output and parameters excluded). Unlike ``SavedBytes`` it sees what inner
  saved-tensor hooks and selective-checkpoint caches keep; unlike ``held_after_forward`` (mallinfo2) it
  has no allocator noise, so it can be compared exactly.
- ``single_thread``: a module-scoped fixture running a test module with one intra-op thread.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ckpt_wrapper.measure import live_bytes_after_forward  # noqa: F401  (re-exported for the tests)
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

MATMUL_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})
"""Matmul overloads a Linear or attention projection dispatches to on CPU."""


class OpCounter(TorchDispatchMode):
    """Counts aten op overloads dispatched while active (``counts[op]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def backward_op_counts(loss_fn: Callable[[], torch.Tensor]) -> collections.Counter:
    """Op counts of ``loss_fn().backward()``, counting the backward only (forward runs outside the mode)."""
    loss = loss_fn()
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def recomputed_ops(wrapped_loss: Callable[[], torch.Tensor], reference_loss: Callable[[], torch.Tensor]) -> dict:
    """Per op, how many more times it ran in the wrapped model's backward than in the reference's."""
    wrapped, reference = backward_op_counts(wrapped_loss), backward_op_counts(reference_loss)
    return {op: wrapped[op] - reference[op] for op in set(wrapped) | set(reference) if wrapped[op] != reference[op]}


def mallinfo2_available() -> bool:
    """Whether ``held_after_forward`` can measure host memory here (glibc >= 2.33)."""
    from ckpt_wrapper.measure import host_allocated_bytes

    try:
        host_allocated_bytes()
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for the module, restored afterwards: these models are tiny, and on a busy
    2-core machine a second thread per op makes planner tests ten times slower, not faster. Numerics are
    unaffected: reference and wrapped models run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
