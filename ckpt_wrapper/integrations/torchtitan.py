"""Checkpointing for torchtitan: an ``activation_checkpoint`` config that applies ckpt_wrapper instead.

torchtitan applies checkpointing through its trainer config: ``parallelize_llama`` (and the other
models' ``parallelize`` functions) call ``config.activation_checkpoint.build().apply(model)`` after tensor
parallelism and before ``torch.compile`` and FSDP2. ``ac_config(...)`` returns a config of the same kind,
so setting it there is the whole change; its ``apply`` wraps every transformer block in
``model.layers`` with ckpt_wrapper, in place:

- ``mode="full"``: the whole block recomputed (torchtitan's ``FullAC``), bitwise the same gradients;
- ``mode="selective"``: an op-level policy (``preset="titan"`` is torchtitan's op list: attention and every
  second matmul saved; ``"matmuls"`` saves every matmul);
- ``mode="plan"``: a plan made by ``ckpt_wrapper.plan`` and saved with ``Plan.save`` (``plan_path``);
- ``offload=True``: what the checkpoint still saves goes to host memory; ``every_n_layers``: every N-th block.

Compared with torchtitan's own: no ``_checkpoint_wrapped_module.`` prefix in parameter and checkpoint names
(torchtitan's state-dict adapters and DCP see the model's own names), RNG state always preserved
(``preserve_rng_state=False`` is refused), and plans and offload available.

Example::

    from ckpt_wrapper.integrations.torchtitan import ac_config

    config = llama3_debugmodel()                       # a torchtitan Trainer.Config
    config.activation_checkpoint = ac_config(mode="selective", preset="titan")

torchtitan is imported only when ``ac_config`` is called (tested: torchtitan 0.3.0, which imports triton).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from ckpt_wrapper.apply import apply_activation_checkpointing
from ckpt_wrapper.log import get_logger
from ckpt_wrapper.planner import Plan
from ckpt_wrapper.selection import BlockSelector, every_nth
from ckpt_wrapper.selective import PRESETS, selective_context_fn
from ckpt_wrapper.wrapper import checkpoint_wrapper

__all__ = ["ac_config", "MODES"]

logger = get_logger(__name__)

MODES = ("full", "selective", "plan")
"""What ``ac_config(mode=...)`` accepts."""


def _torchtitan() -> Any:
    try:
        from torchtitan.distributed import activation_checkpoint
    except ImportError as error:
        raise ImportError(
            f"ckpt_wrapper.integrations.torchtitan needs torchtitan, which cannot be imported ({error}). Install it "
            "with: pip install --no-deps torchtitan==0.3.0 plus its imports (tyro, einops, spmd_types, triton); see "
            "docs/integrations.md"
        ) from error
    return activation_checkpoint


class _Blocks(BlockSelector):
    """The children of the model's ``layers`` container: torchtitan's transformer blocks."""

    def __init__(self, layers: nn.Module) -> None:
        self.blocks = {id(block) for block in layers.children()}

    def matches(self, name: str, module: nn.Module) -> bool:
        return id(module) in self.blocks

    def describe(self) -> str:
        return "the blocks in model.layers"


def _apply(config: Any, model: nn.Module) -> list[str]:
    """Wrap ``model``'s blocks as ``config`` says; in place."""
    if config.preserve_rng_state is False:
        raise ValueError(
            "ckpt_wrapper's torchtitan config keeps RNG state preserved (preserve_rng_state=False makes the recompute "
            "draw other dropout masks than the forward); set preserve_rng_state=True, or use torchtitan's FullAC"
        )
    if config.mode == "plan":
        if not config.plan_path:
            raise ValueError("mode='plan' needs plan_path, the file written by ckpt_wrapper.plan(...).save(path)")
        return Plan.load(config.plan_path).apply(model)
    try:
        layers = model.get_submodule("layers")
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no 'layers' container; torchtitan's models keep their "
                         "transformer blocks there") from None
    options: dict[str, Any] = {"determinism_check": config.determinism_check, "debug": config.debug,
                               "offload": config.offload}
    if config.mode == "selective":
        options["context_fn"] = selective_context_fn(config.preset)
    selector: BlockSelector = _Blocks(layers)
    if config.every_n_layers > 1:
        selector = every_nth(config.every_n_layers, selector)
    return apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, **options),
                                          check_fn=selector)


@functools.cache
def _policy_class() -> type:
    base = _torchtitan().ActivationCheckpointing

    class CkptWrapperAC(base):
        """torchtitan activation checkpointing through ckpt_wrapper (see ``ac_config``)."""

        @dataclass(kw_only=True, slots=True)
        class Config(base.Config):
            mode: str = "full"
            """``full``, ``selective`` or ``plan``."""
            preset: str = "titan"
            """The selective policy: a name in ``ckpt_wrapper.PRESETS``."""
            plan_path: str = ""
            """For ``mode="plan"``: the JSON written by ``Plan.save``."""
            every_n_layers: int = 1
            """Checkpoint every N-th block (full and selective)."""
            offload: bool = False
            """Also keep what the checkpoint saves in host memory."""

        def apply(self, model: nn.Module) -> None:
            wrapped = _apply(self.config, model)
            logger.info("ckpt_wrapper %s checkpointing on %d block(s): %s", self.config.mode, len(wrapped), wrapped)

    CkptWrapperAC.__module__, CkptWrapperAC.__qualname__ = __name__, "CkptWrapperAC"
    return CkptWrapperAC


def ac_config(*, mode: str = "full", preset: str = "titan", plan_path: str = "", every_n_layers: int = 1,
              offload: bool = False, **options: Any) -> Any:
    """A torchtitan ``activation_checkpoint`` config that checkpoints with ckpt_wrapper.

    Args:
        mode: ``"full"`` (every block recomputed), ``"selective"`` (op-level, ``preset``) or ``"plan"``.
        preset: the selective policy, a name in ``ckpt_wrapper.PRESETS`` (``"titan"``: torchtitan's op list).
        plan_path: for ``mode="plan"``, a plan saved with ``Plan.save`` (block names as in the model, ``layers.0``).
        every_n_layers: checkpoint every N-th block only.
        offload: keep what the checkpoint saves (block inputs) in host memory.
        **options: torchtitan's common fields: ``determinism_check``, ``debug``, ``preserve_rng_state`` (True only).

    Returns:
        A config whose ``build().apply(model)`` wraps the blocks, where torchtitan applies its own.

    Raises:
        ImportError: if torchtitan cannot be imported.
        ValueError: for an unknown mode or preset, ``preserve_rng_state=False``, or ``every_n_layers < 1``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; ac_config takes one of {MODES}")
    if preset not in PRESETS:
        raise ValueError(f"unknown selective preset {preset!r}; presets: {sorted(PRESETS)}")
    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be an int >= 1, got {every_n_layers!r}")
    if options.get("preserve_rng_state", True) is False:
        raise ValueError("preserve_rng_state=False changes dropout in the recompute; ckpt_wrapper keeps it True")
    return _policy_class().Config(mode=mode, preset=preset, plan_path=plan_path, every_n_layers=every_n_layers,
                                  offload=offload, **options)
