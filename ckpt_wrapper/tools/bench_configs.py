"""The configurations ``ckpt-wrapper bench`` compares: ckpt_wrapper's wrappers and PyTorch's own tools.

PyTorch's tools are called directly (its private ``checkpoint_wrapper``, ``offload_wrapper`` and
``create_selective_checkpoint_contexts`` with policies written here), not through ``ckpt_wrapper``, so
they are independent anchors. Plans (``plan_B``) wrap nothing here: ``ckpt-wrapper bench`` plans them
at run time.

Example:
    >>> from ckpt_wrapper.tools.bench_configs import configurations, select
    >>> [c.name for c in select(configurations(4, (2,), cuda=False), ("torch_first*",))]
    ['none', 'torch_first2', 'torch_first2+sac_matmuls', 'torch_first2+sac_titan']
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_ac
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import ckpt_wrapper
from ckpt_wrapper.testing import models

__all__ = ["BenchConfig", "compile_configs", "configurations", "plan_config", "select"]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One way to checkpoint the model: its name in tables and JSON, and how it wraps a copy."""

    name: str
    """Label in tables, JSON and ``--configs``."""
    family: str
    """``baseline``, ``ckpt_wrapper``, ``pytorch`` or ``plan``."""
    description: str
    """What it does, in the table's last column."""
    wrap: Callable[[nn.Module], Any]
    """Modifies a copy of the model in place."""
    counts_flops: bool = True
    """Whether ``FlopCounterMode`` sees its ops (not so for compiled code, whose kernels bypass the dispatcher)."""


def plan_config(budget: float) -> BenchConfig:
    """The placeholder of ``ckpt_wrapper.plan`` at ``budget`` (planned and applied at run time)."""
    return BenchConfig(f"plan_{budget:g}", "plan", f"ckpt_wrapper.plan at budget {budget:g}", lambda m: None)


# --- PyTorch's own tools, called directly (not through ckpt_wrapper.selective) ---------------------

_aten = torch.ops.aten
_TORCH_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}
_TORCH_ATTENTION = {
    getattr(_aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(_aten, name)
}


def _torch_sac_context(preset: str) -> Callable[[], Any]:
    """A ``context_fn`` as torchtitan writes one: fresh per-checkpoint state, counted per pass.

    ``matmuls`` saves every matmul and attention output. ``titan`` is torchtitan's op list (attention
    saved, every second matmul recomputed); ``addmm`` counts as a matmul because the GPT's linears
    have biases (torchtitan's models have none, so its list names only ``mm``).
    """

    def context_fn() -> Any:
        counts: collections.Counter[str] = collections.Counter()

        def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
            if op in _TORCH_ATTENTION:
                return CheckpointPolicy.MUST_SAVE
            if op in _TORCH_MATMULS:
                key = "recompute" if ctx.is_recompute else "forward"
                counts[key] += 1
                if preset == "titan" and counts[key] % 2 == 0:
                    return CheckpointPolicy.PREFER_RECOMPUTE
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return context_fn


def _torch_wrap_blocks(model: nn.Module, indices: range, preset: str | None) -> None:
    """PyTorch's ``checkpoint_wrapper`` on ``model.layers[i]``: full, or selective with ``preset``."""
    extra = {} if preset is None else {"context_fn": _torch_sac_context(preset)}
    for i in indices:
        model.layers[i] = torch_ac.checkpoint_wrapper(
            model.layers[i], checkpoint_impl=torch_ac.CheckpointImpl.NO_REENTRANT, **extra)


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, models.Block)


def configurations(n_layer: int, hand_k: Sequence[int], *, cuda: bool) -> list[BenchConfig]:
    """Every non-plan configuration for a GPT of ``n_layer`` blocks, in table order.

    Args:
        n_layer: the model's blocks.
        hand_k: K of the hand recipes "PyTorch full checkpointing of the first K blocks".
        cuda: whether to add the offload configurations (they offload to host memory: CUDA only).
    """
    every = range(n_layer)
    configs = [
        BenchConfig("none", "baseline", "no checkpointing", lambda m: None),
        BenchConfig("ckpt_full", "ckpt_wrapper", "apply_activation_checkpointing on every block",
                    lambda m: ckpt_wrapper.apply_activation_checkpointing(m, check_fn=_is_block)),
        BenchConfig("torch_full", "pytorch", "PyTorch checkpoint_wrapper on every block",
                    lambda m: torch_ac.apply_activation_checkpointing(
                        m, checkpoint_wrapper_fn=torch_ac.checkpoint_wrapper, check_fn=_is_block)),
    ]
    for preset, saves in (("matmuls", "matmuls and attention"), ("titan", "attention, every second matmul")):
        configs += [
            BenchConfig(f"ckpt_sac_{preset}", "ckpt_wrapper", f"selective_context_fn({preset!r}) on every block ({saves})",
                        functools.partial(_ckpt_sac, preset=preset)),
            BenchConfig(f"torch_sac_{preset}", "pytorch", f"PyTorch selective checkpointing saving {saves}",
                        functools.partial(_torch_wrap_blocks, indices=every, preset=preset)),
        ]
    configs.append(BenchConfig("ckpt_cheap", "ckpt_wrapper", "cheap_recompute_wrapper on every block",
                               lambda m: [ckpt_wrapper.cheap_recompute_wrapper(b) for b in m.layers]))
    for k in hand_k:
        for rest in (None, "matmuls", "titan"):
            name = f"torch_first{k}" + (f"+sac_{rest}" if rest else "")
            configs.append(BenchConfig(
                name, "pytorch",
                f"PyTorch checkpoint_wrapper on the first {k} blocks, the rest " + (f"selective ({rest})" if rest else "unwrapped"),
                functools.partial(_hand_recipe, k=k, rest=rest)))
    if _torch_remat() is not None:
        for save, what in (((), "nothing saved inside"), (("attn",), "attention a save region")):
            name = "remat_full" if not save else "remat_save_" + "+".join(save)
            configs.append(BenchConfig(name, "pytorch", f"torch_remat checkpoint on every block, {what} (hand-annotated)",
                                       functools.partial(_remat_blocks, save=save)))
    if cuda:
        configs += [
            BenchConfig("ckpt_offload", "ckpt_wrapper", "offload_wrapper on every block",
                        lambda m: ckpt_wrapper.apply_activation_checkpointing(
                            m, checkpoint_wrapper_fn=ckpt_wrapper.offload_wrapper, check_fn=_is_block)),
            BenchConfig("torch_offload", "pytorch", "PyTorch offload_wrapper (save_on_cpu, pinned) on every block",
                        lambda m: torch_ac.apply_activation_checkpointing(
                            m, checkpoint_wrapper_fn=torch_ac.offload_wrapper, check_fn=_is_block)),
        ]
    return configs


def compile_configs(budgets: Sequence[float]) -> list[BenchConfig]:
    """``torch.compile`` of the whole model under its ``activation_memory_budget``: 1.0 (its default) and each budget.

    Each configuration compiles with a backend of its own, so the budget in force when its graphs are
    partitioned is its own, and no configuration reuses another's compiled graphs.
    """
    return [BenchConfig(f"compile_{budget:g}", "pytorch",
                        f"torch.compile, activation_memory_budget={budget:g} (inductor)",
                        functools.partial(_compile, budget=budget), counts_flops=False)
            for budget in sorted({1.0, *budgets}, reverse=True)]


def _compile(model: nn.Module, *, budget: float) -> None:
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def backend(graph: Any, example_inputs: Any) -> Any:
        with functorch_config.patch(activation_memory_budget=budget):
            return compile_fx(graph, example_inputs)

    model.forward = torch.compile(model.forward, backend=backend)


def _torch_remat() -> Any:
    """The ``torch_remat`` module when it is installed (the optional anchor, ``pip install 'ckpt_wrapper[anchors]'``), else ``None``."""
    try:
        import torch_remat
    except ImportError:
        return None
    return torch_remat


def _remat_blocks(model: nn.Module, *, save: tuple[str, ...]) -> None:
    """Every block through ``torch_remat.checkpoint``, its children in ``save`` annotated as save regions.

    torch_remat needs the block's forward written with its annotations; this is the pre-norm block's forward
    (``models.Block``) so written, on the bench's copy of the model (the model's own code is not changed).
    """
    remat = _torch_remat()

    def child(block: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        module = getattr(block, name)
        if name not in save:
            return module

        def saved(x: torch.Tensor) -> torch.Tensor:
            out = remat.region(module, name, recompute=False)(x)
            remat.recompute_needs_tensor(out)
            return out

        return saved

    for index, block in enumerate(model.layers):
        attn, mlp = child(block, "attn"), child(block, "mlp")

        def body(x: torch.Tensor, block: nn.Module = block, attn: Any = attn, mlp: Any = mlp) -> torch.Tensor:
            x = x + attn(block.ln_1(x))
            return x + mlp(block.ln_2(x))

        block.forward = remat.checkpoint(region_name=f"layers.{index}")(body)


def _ckpt_sac(model: nn.Module, *, preset: str) -> None:
    for block in model.layers:
        ckpt_wrapper.checkpoint_wrapper(block, context_fn=ckpt_wrapper.selective_context_fn(preset))


def _hand_recipe(model: nn.Module, *, k: int, rest: str | None) -> None:
    _torch_wrap_blocks(model, range(k), None)
    if rest is not None:
        _torch_wrap_blocks(model, range(k, len(model.layers)), rest)


def select(configs: list[BenchConfig], patterns: Sequence[str] | None) -> list[BenchConfig]:
    """``none`` and the configurations whose names match a shell pattern of ``patterns`` (``None``: all).

    Raises:
        ValueError: if a pattern matches no configuration.
    """
    if patterns is None:
        return configs
    names = [c.name for c in configs]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(f"--configs {unmatched} match no configuration; there are {names}")
    return [c for c in configs if c.name == "none" or any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


