"""torchtitan integration: ``ac_config(...)`` in place of torchtitan's own ``activation_checkpoint`` config.

The multi-process test runs this file under torchrun (2 CPU processes, gloo). Each run builds torchtitan's
own llama3 (its ``debugmodel`` configuration cut to 2 layers, with torchtitan's SDPA inner attention:
FlexAttention has no CPU backward) and parallelizes it with torchtitan's own ``parallelize_llama`` (the
function that applies the ``activation_checkpoint`` config, then FSDP2 over both ranks), then trains 2
SGD steps. Gradients and parameters of ckpt_wrapper's full, selective and planned checkpointing are
compared bitwise with torchtitan's ``FullAC`` and with no checkpointing.

Two CPU-only adjustments, the same for every run: torchtitan picks its device type at import and falls
back to ``"cuda"`` where there is no accelerator, so the mesh is built with ``device_type="cpu"``; and gloo
has no ``PREMUL_SUM`` reduction (the one FSDP2 uses for torchtitan's gradient divide factor), so FSDP2 is
told to reduce with sums (``set_force_sum_reduction_for_comms``), which divides after the reduction.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pool import launch_report, print_report

pytestmark = pytest.mark.timeout(420)

HERE = Path(__file__).resolve()
STEPS = 2


def _torchtitan_importable() -> str | None:
    """Why torchtitan cannot be used here, or None."""
    if importlib.util.find_spec("torchtitan") is None:
        return "torchtitan is not installed (the [integrations] extra installs it with --no-deps: make setup)"
    if importlib.util.find_spec("triton") is None:
        return "torchtitan 0.3.0 imports triton at import time (torchtitan.models.common via minimal_async_ep.kernels)"
    return None


needs_torchtitan = pytest.mark.skipif(_torchtitan_importable() is not None, reason=str(_torchtitan_importable()))


def test_ac_config_refuses_what_would_change_training() -> None:
    """Unknown modes and presets, ``every_n_layers < 1`` and ``preserve_rng_state=False`` are refused up front.

    A failure means a typo trains with some other checkpointing, or dropout changes in the recompute.
    """
    from ckpt_wrapper.integrations.torchtitan import ac_config

    with pytest.raises(ValueError, match="unknown mode"):
        ac_config(mode="fulll")
    with pytest.raises(ValueError, match="unknown selective preset"):
        ac_config(mode="selective", preset="tital")
    with pytest.raises(ValueError, match="every_n_layers"):
        ac_config(every_n_layers=0)
    with pytest.raises(ValueError, match="preserve_rng_state"):
        ac_config(preserve_rng_state=False)


@needs_torchtitan
@pytest.mark.slow
def test_two_cpu_ranks_parallelize_llama_with_fsdp2() -> None:
    """torchtitan's llama3 through its own ``parallelize_llama`` + FSDP2 on 2 CPU ranks: ckpt_wrapper's full,
    selective and planned checkpointing give gradients and parameters bitwise equal to torchtitan's FullAC
    (and to no checkpointing), with the model's own parameter names where FullAC adds its prefix.

    A failure names the run and tensor that differ, with every rank's traceback.
    """
    report = launch_report(2, str(HERE), "cpu")
    assert report["full"]["wrapped"] == report["selective"]["wrapped"] == ["layers.0", "layers.1"], report
    assert report["plan"]["wrapped"], report
    assert report["every_2_offload"]["wrapped"] == ["layers.0"], report
    assert report["torchtitan_full"]["prefixed_names"] > 0 and report["full"]["prefixed_names"] == 0, report


# --- the runs, on every rank of the launched job -------------------------------------------------------------


def tiny_llama():
    """torchtitan's llama3 debugmodel, 2 layers, SDPA inner attention; seeded."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import llama3_configs

    config = llama3_configs["debugmodel"](attn_backend="flex")
    config.layers = config.layers[:2]
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(0)
    model = config.build()
    model.init_states(buffer_device=None)
    return model


def parallelize(model, ac_config, world_size: int):
    """torchtitan's ``parallelize_llama``: ``ac_config``'s checkpointing, then FSDP2 over every rank (CPU, gloo)."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3 import parallelize_llama

    parallel_dims_module.device_type = "cpu"  # torchtitan falls back to "cuda" when no accelerator is present
    parallelism = ParallelismConfig(spmd_backend="partial_dtensor")
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, world_size=world_size,
                        spmd_backend="partial_dtensor")
    parallelize_llama(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"),
                      parallelism=parallelism, compile_config=CompileConfig(), ac_config=ac_config,
                      dump_folder=tempfile.gettempdir())
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def batch(rank: int, step: int, vocab: int = 2048, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq + 1), generator=torch.Generator().manual_seed(1000 * step + rank))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()


def _train(base, ac_config, rank: int, world_size: int) -> dict:
    import torch.nn.functional as F

    model = parallelize(copy.deepcopy(base), ac_config, world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        tokens = batch(rank, step)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        grads.append([_local(p.grad) for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad()
    from ckpt_wrapper.state import ActivationWrapper

    names = [name for name, _ in model.named_parameters()]
    return {"wrapped": [fqn for fqn, m in model.named_modules() if isinstance(m, ActivationWrapper)], "grads": grads,
            "params": [_local(p) for p in model.parameters()], "names": names,
            "prefixed_names": sum("_checkpoint_wrapped_module" in name for name in names)}


def _same(got: dict, expected: dict, what: str) -> None:
    for step, (a, b) in enumerate(zip(got["grads"], expected["grads"], strict=True)):
        assert len(a) == len(b) and a, f"{what}: step {step} has {len(a)} gradients, the reference {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m: f"{what} step {step} grad {got['names'][i]}: {m}")
    for i, (x, y) in enumerate(zip(got["params"], expected["params"], strict=True)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m: f"{what} param {got['names'][i]}: {m}")


def scenarios(folder: str) -> dict:
    import torch.distributed as dist
    from torchtitan.distributed.activation_checkpoint import FullAC

    import ckpt_wrapper
    from ckpt_wrapper.integrations.torchtitan import ac_config

    rank, world_size = dist.get_rank(), dist.get_world_size()
    base = tiny_llama()
    plain = _train(base, None, rank, world_size)
    theirs = _train(base, FullAC.Config(), rank, world_size)
    _same(theirs, plain, "torchtitan FullAC vs no checkpointing")
    report = {"torchtitan_full": {"prefixed_names": theirs["prefixed_names"]}}

    plan = ckpt_wrapper.plan(copy.deepcopy(base), batch(0, 0)[:, :-1], memory_budget=0.93, measure="saved", cost="flops",
                             check_fn=ckpt_wrapper.by_name("layers.*"))
    plan_path = os.path.join(folder, "plan.json")
    plan.save(plan_path)  # every rank holds the same plan (rank 0 made it); each saves its own copy
    runs = {"full": ac_config(mode="full"), "selective": ac_config(mode="selective", preset="titan"),
            "plan": ac_config(mode="plan", plan_path=plan_path),
            "every_2_offload": ac_config(mode="full", every_n_layers=2, offload=True)}
    for name, config in runs.items():
        ours = _train(base, config, rank, world_size)  # parallelize_llama calls config.build().apply(model)
        _same(ours, theirs, f"ckpt_wrapper {name} vs torchtitan FullAC")
        assert ours["names"] == plain["names"], f"{name}: parameter names changed"
        report[name] = {"wrapped": ours["wrapped"], "prefixed_names": ours["prefixed_names"]}
    return report


def _main() -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    with tempfile.TemporaryDirectory() as folder:
        report = scenarios(folder)
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
