"""``ckpt-wrapper parity`` under torchrun: the harness users run on their own model, end to end.

CPU cells use gloo; CUDA cells (world size 1 with NCCL, bf16 mixed precision) prove the CUDA paths and
skip without a GPU; multi-GPU cells skip with fewer than two GPUs.
"""

from __future__ import annotations

import pytest
import torch

from pool import torchrun

pytestmark = pytest.mark.timeout(300)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices")


def _parity(nproc: int, *flags: str) -> str:
    result = torchrun(nproc, "-m", "ckpt_wrapper", "parity", *flags)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert ": OK" in result.stdout, output[-6000:]
    return result.stdout


@pytest.mark.parametrize("flags", [
    ("--parallel", "fsdp2"),
    ("--parallel", "fsdp1", "--ac-order", "after", "--sharding-strategy", "SHARD_GRAD_OP"),
    ("--parallel", "ddp", "--ac", "offload"),
], ids=["fsdp2", "fsdp1-after", "ddp-offload"])
def test_parity_command_passes_on_cpu_ranks(flags):
    """The command trains the built-in GPT on 2 gloo ranks and reports parity; exit status 0."""
    _parity(2, *flags)


def test_parity_command_exits_nonzero_when_model_differs():
    """A user model whose blocks behave differently when recomputed must fail the check (exit 1)."""
    result = torchrun(2, "-m", "ckpt_wrapper", "parity", "--model", "parity_targets:drifting_model",
                      "--batch-fn", "parity_targets:batch", "--blocks", "Drifting", "--parallel", "ddp",
                      env={"PYTHONPATH": _here()})
    assert result.returncode == 1, result.stdout + result.stderr[-4000:]
    assert "FAILED" in result.stdout


def test_parity_command_rejects_model_without_batch():
    """--model without --batch-fn is a usage error naming the missing flag, not a traceback or a hang."""
    result = torchrun(1, "-m", "ckpt_wrapper", "parity", "--model", "parity_targets:drifting_model",
                      "--parallel", "none", env={"PYTHONPATH": _here()})
    assert result.returncode != 0 and "needs --batch-fn" in result.stderr, result.stderr[-3000:]


def test_old_flag_spellings_still_parse_to_the_same_options(capsys):
    """``--shard``, ``--order``, ``--strategy``, ``--no-reshard``, ``--wrap`` and ``--batch`` (the spellings
    before the shared vocabulary) give the options of the new flags, each with a one-line note.

    No ranks. A failure means a parity command line written for an earlier release now fails or changes
    meaning.
    """
    import argparse

    from ckpt_wrapper.testing.command import add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def options(*flags):
        return options_from_args(parser.parse_args(list(flags)))

    old = options("--shard", "fsdp2", "--order", "after", "--no-reshard", "--wrap", "offload",
                  "--model", "m:f", "--batch", "m:b")
    new = options("--parallel", "fsdp2", "--ac-order", "after", "--sharding-strategy", "SHARD_GRAD_OP",
                  "--ac", "offload", "--model", "m:f", "--batch-fn", "m:b")
    assert old == new and new.wrap == "offload" and new.batch == "m:b" and not new.recipe.reshard_after_forward
    assert options("--shard", "fsdp1", "--strategy", "NO_SHARD") == options(
        "--parallel", "fsdp1", "--sharding-strategy", "NO_SHARD")
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 7 and all(n.startswith("note: ") and "deprecated" in n for n in notes), notes
    assert options("--model", "gpt").model is None  # the built-in GPT, by name


def _here() -> str:
    import os

    return os.path.dirname(os.path.abspath(__file__))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("flags", [
    ("--parallel", "fsdp2", "--param-dtype", "bf16", "--reduce-dtype", "fp32", "--reference", "sharded"),
    ("--parallel", "fsdp2", "--sharding-strategy", "SHARD_GRAD_OP", "--param-dtype", "bf16", "--reduce-dtype", "fp32",
     "--reference", "sharded", "--ac", "offload"),
    ("--parallel", "fsdp1", "--param-dtype", "bf16", "--reduce-dtype", "fp32", "--reference", "sharded"),
    ("--parallel", "fsdp1", "--ac-order", "after", "--use-orig-params", "--param-dtype", "bf16",
     "--reference", "sharded"),
    ("--parallel", "fsdp1", "--fsdp1-cpu-offload"),
    ("--parallel", "fsdp1", "--fsdp1-cpu-offload", "--use-orig-params"),
], ids=["fsdp2-bf16", "fsdp2-bf16-noreshard-offload", "fsdp1-bf16", "fsdp1-after-bf16", "fsdp1-cpuoffload", "fsdp1-cpuoffload-orig"])
def test_parity_on_one_gpu_with_nccl(flags):
    """World size 1 on CUDA with NCCL: streams and mixed-precision casts under recompute."""
    _parity(1, "--device", "cuda", *flags)


@needs_2_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("flags", [("--parallel", "fsdp2"), ("--parallel", "fsdp1", "--ac-order", "after"),
                                   ("--parallel", "ddp")],
                         ids=["fsdp2", "fsdp1-after", "ddp"])
def test_parity_on_two_gpus_with_nccl(flags):
    """Two CUDA ranks with NCCL."""
    _parity(2, "--device", "cuda", *flags)
