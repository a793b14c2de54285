"""What a recompute must not redo: buffer updates and draws from explicit generators.

Checkpointing runs a block's forward twice, once in forward and once in backward. A forward that
updates a buffer (BatchNorm's running statistics and ``num_batches_tracked``, an EMA under
``no_grad``) would update it twice per step, and a forward that draws from an explicit
``torch.Generator`` would draw different numbers the second time (``torch.utils.checkpoint`` restores
only the global RNG states). ``ForwardRecord`` takes the block's buffer and generator state when the
forward runs; around the recompute it puts the forward's inputs back (buffers as they were before
the forward, generators at their state then), and afterwards restores what the recompute found, so
the recompute sees exactly what the forward saw and leaves no trace.

The cost: one pass over the block's buffers per forward (references and version counters, no
copies), a copy of each buffer the block is known to update in place (learned on its first forward,
when every buffer is copied once), and the state of each generator the forward can reach (a module
attribute of the block, or an argument).

Example:
    >>> import torch
    >>> from ckpt_wrapper import checkpoint_wrapper
    >>> block = checkpoint_wrapper(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)))
    >>> block(torch.randn(8, 4, requires_grad=True)).sum().backward()
    >>> int(block[1].num_batches_tracked)  # once, although the forward ran twice
    1
"""

from __future__ import annotations

from typing import Any

import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["ForwardRecord", "UpdatedBuffers"]


@contextlib.contextmanager
def _bookkeeping():
    # Copies made here are not part of the block's computation: hidden from autograd, from dispatch
    # modes that count or cache the forward's ops (selective checkpointing's, FLOP counters), and
    # from version counters (x.data does not share x's), so the tensors autograd saved in the
    # recompute stay valid after their values are put back.
    with torch.no_grad(), _disable_current_modes():
        yield


class UpdatedBuffers:
    """What recomputes of one block must know, learned on its first forward, kept in its state."""

    def __init__(self) -> None:
        self.learned = False
        """Whether one forward has been seen (before it, every buffer is copied)."""
        self.names: frozenset[str] = frozenset()
        """Names (relative to the block) of the buffers the forward updated in place."""
        self.buffers: tuple[str, ...] = ()
        """Names of all the block's buffers (relative to it), found on the first forward."""
        self.generators: tuple[tuple[str, str], ...] = ()
        """(submodule, attribute) of each ``torch.Generator`` the block's modules hold."""

    def learn_layout(self, block: nn.Module) -> None:
        """Find the block's buffers and generator attributes once (a walk costs more than a forward's
        bookkeeping should)."""
        self.buffers = tuple(name for name, b in block.named_buffers(remove_duplicate=False) if b is not None)
        self.generators = tuple((name, attr) for name, module in block.named_modules()
                                for attr, value in vars(module).items() if type(value) is torch.Generator)


def _buffer(block: nn.Module, name: str) -> torch.Tensor | None:
    owner, leaf = _owner(block, name)
    return owner._buffers.get(leaf)


def _leaves(args: tuple, kwargs: dict) -> list[Any]:
    if not kwargs and all(type(a) is torch.Tensor for a in args):
        return list(args)  # the common call, without a pytree walk
    return pytree.tree_leaves((args, kwargs))


class ForwardRecord:
    """The state one forward of ``block`` started from, and the means to replay it in a recompute."""

    def __init__(self, block: nn.Module, updated: UpdatedBuffers, args: tuple, kwargs: dict) -> None:
        self.block, self.updated = block, updated
        if not updated.learned:
            updated.learn_layout(block)
        self.before = {name: (b, b._version) for name in updated.buffers if (b := _buffer(block, name)) is not None}
        wanted = self.before if not updated.learned else updated.names
        leaves = _leaves(args, kwargs)
        # The recompute reads the block's inputs again: the forward must not have changed them.
        self.inputs = [(leaf, leaf._version) for leaf in leaves if isinstance(leaf, torch.Tensor)]
        generators = [leaf for leaf in leaves if type(leaf) is torch.Generator]
        for name, attr in updated.generators:
            value = getattr(block.get_submodule(name), attr, None)
            if type(value) is torch.Generator and all(value is not g for g in generators):
                generators.append(value)
        self.copies: dict[str, torch.Tensor] = {}
        self.generators: list[tuple[torch.Generator, torch.Tensor]] = []
        # Copies only of what the forward may overwrite in place; a buffer it replaces keeps its old object.
        if wanted or generators:
            with _bookkeeping():
                self.copies = {name: self.before[name][0].clone() for name in wanted if name in self.before}
                self.generators = [(g, g.get_state()) for g in generators]
        self.in_place: dict[str, torch.Tensor | None] = {}
        self.replaced: dict[str, torch.Tensor] = {}

    def finish_forward(self) -> bool:
        """Note which buffers the forward changed, keeping the pre-forward values of those only.

        Returns:
            Whether the forward modified one of its input tensors in place; a recompute could not
            replay such a forward.
        """
        modified = any(tensor._version != version for tensor, version in self.inputs)
        self.inputs = []
        if self.before:
            now = {name: _buffer(self.block, name) for name in self.before}
            with _bookkeeping():
                self._compare(now)
        self.updated.names = self.updated.names | set(self.in_place) if self.updated.learned else frozenset(self.in_place)
        self.updated.learned = True
        self.before, self.copies = {}, {}
        return modified

    def _compare(self, now: dict[str, torch.Tensor | None]) -> None:
        for name, (buffer, version) in self.before.items():
            if now.get(name) is not buffer:
                self.replaced[name] = buffer  # the old object is the old value
            elif name in self.updated.names or buffer._version != version or (
                # Kernels such as batch norm's update running statistics without bumping the version
                # counter: on the first forward, when every buffer was copied, compare the values too.
                not self.updated.learned and not torch.equal(self.copies[name], buffer)
            ):
                # None: updated in place for the first time after the block's first forward (an update
                # that is conditional). The recompute still leaves no trace, but reads the updated value.
                self.in_place[name] = self.copies.get(name)

    @property
    def needed(self) -> bool:
        """Whether the recompute has anything to replay or undo."""
        return bool(self.in_place or self.replaced or self.generators)

    def replay(self) -> _Replay:
        """A context for the recompute: the forward's starting state inside, the present one after."""
        return _Replay(self)


def _owner(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (block.get_submodule(parent) if parent else block), leaf


class _Replay:
    def __init__(self, record: ForwardRecord) -> None:
        self.record = record
        self.restore: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
        self.generator_states: list[tuple[torch.Generator, torch.Tensor]] = []

    def __enter__(self) -> None:
        record = self.record
        with _bookkeeping():
            for name, before in record.in_place.items():
                owner, leaf = _owner(record.block, name)
                current = owner._buffers[leaf]
                self.restore.append((current, current.clone()))
                if before is not None:
                    current.data.copy_(before)
        for name, before in record.replaced.items():
            owner, leaf = _owner(record.block, name)
            self.swapped.append((owner, leaf, owner._buffers[leaf]))
            owner._buffers[leaf] = before
        with _bookkeeping():
            for generator, state in record.generators:
                self.generator_states.append((generator, generator.get_state()))
                generator.set_state(state)

    def __exit__(self, *exc: Any) -> None:
        with _bookkeeping():
            for current, saved in self.restore:
                current.data.copy_(saved)
        for owner, leaf, current in self.swapped:
            owner._buffers[leaf] = current
        with _bookkeeping():
            for generator, state in self.generator_states:
                generator.set_state(state)
