"""``ckpt-wrapper parity`` on 2 ranks: the harness users run on their own model, end to end.

CPU cells use gloo. One passing cell and the usage error run under torchrun, ``python -m ckpt_wrapper
parity`` end to end; the other CPU cells run the same command (``ckpt_wrapper.tools.cli.main``) on the
session's rank pool, which the command joins and leaves as it does torchrun's group. CUDA cells (world
size 1 with NCCL, bf16 mixed precision) prove the CUDA paths and skip without a GPU; multi-GPU cells skip
with fewer than two GPUs.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

import driver_cells
from pool import torchrun

pytestmark = pytest.mark.timeout(300)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices")


def _parity(nproc: int, *flags: str) -> str:
    result = torchrun(nproc, "-m", "ckpt_wrapper", "parity", *flags, env=_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert ": OK" in result.stdout, output[-6000:]
    return result.stdout


def _parity_in_pool(pool, *flags: str, status: int = 0) -> str:
    """``ckpt-wrapper parity FLAGS`` on every rank of ``pool``; each rank's exit status is ``status``.
    Returns the ranks' stdout joined, as torchrun prints it."""
    results = pool.run(driver_cells.run_cli, ["parity", *flags])
    output = "\n".join(f"=== rank {rank}: exit status {code}\n{out[-4000:]}\n{err[-4000:]}"
                       for rank, (code, out, err) in enumerate(results))
    assert [code for code, _, _ in results] == [status] * pool.world, output
    return "".join(out for _, out, _ in results)


@pytest.mark.parametrize("flags", [
    ("--parallel", "fsdp2"),
    ("--parallel", "fsdp1", "--ac-order", "after", "--sharding-strategy", "SHARD_GRAD_OP"),
    ("--parallel", "ddp", "--ac", "offload"),
], ids=["fsdp2", "fsdp1-after", "ddp-offload"])
def test_parity_command_passes_on_cpu_ranks(pool2, flags):
    """The command trains the built-in GPT on 2 gloo ranks and reports parity; exit status 0.
    FSDP2 under torchrun (the entry point end to end), the other recipes in the pool."""
    if flags == ("--parallel", "fsdp2"):
        _parity(2, *flags)
    else:
        stdout = _parity_in_pool(pool2, *flags)
        assert ": OK" in stdout, stdout[-6000:]


def test_parity_command_exits_nonzero_when_model_differs(pool2):
    """A user model whose blocks behave differently when recomputed must fail the check (exit 1 on every rank)."""
    stdout = _parity_in_pool(pool2, "--model", "parity_targets:drifting_model", "--batch-fn", "parity_targets:batch",
                             "--blocks", "Drifting", "--parallel", "ddp", status=1)
    assert "FAILED" in stdout


def test_parity_command_rejects_model_without_batch():
    """--model without --batch-fn, for a model with no ``config.vocab_size`` to draw tokens from, is a usage
    error (the rank exits 2 with one line; torchrun itself exits 1) naming the missing flag, not a traceback
    or a hang."""
    result = torchrun(1, "-m", "ckpt_wrapper", "parity", "--model", "parity_targets:drifting_model",
                      "--blocks", "Drifting", "--parallel", "none", env=_env())
    errors = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and "needs --batch-fn" in errors[0] and "[rank0]: Traceback" not in result.stderr, errors


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
    return os.path.dirname(os.path.abspath(__file__))


def _env() -> dict[str, str]:
    """PYTHONPATH for the ranks: this checkout first (not whichever ckpt_wrapper is installed), then the targets."""
    root = str(pathlib.Path(_here()).parents[1])
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, _here(), os.environ.get("PYTHONPATH")) if p)}


def test_ranks_import_this_checkout():
    """The torchrun ranks run the ckpt_wrapper of this checkout, beside the test targets.

    Failed before: the negative tests replaced PYTHONPATH with the tests folder alone, so their ranks
    imported whichever ckpt_wrapper was installed (another checkout) and tested that code instead.
    """
    import subprocess
    import sys

    code = "import ckpt_wrapper, parity_targets; print(ckpt_wrapper.__file__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **_env()}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert pathlib.Path(result.stdout.strip()).parents[1] == pathlib.Path(_here()).parents[1], result.stdout


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_parity_command_on_a_hugging_face_llama(pool2, parallel):
    """A Hugging Face LlamaForCausalLM (built from a config) on 2 CPU ranks (the pool), with no batch
    function (token ids from its vocabulary) and its ``CausalLMOutputWithPast`` compared by the logits.

    Failed before: ``AttributeError: 'CausalLMOutputWithPast' object has no attribute 'flatten'`` (and
    ``--model`` without ``--batch-fn`` was refused).
    """
    pytest.importorskip("transformers")
    stdout = _parity_in_pool(pool2, "--model", "parity_targets:llama", "--blocks", "LlamaDecoderLayer",
                             "--parallel", parallel, "--min-ranks", "2")
    assert ": OK" in stdout, stdout[-6000:]
    assert "2 block(s) wrapped" in stdout and "parity OK on 2 ranks (world size 2): exit status 0" in stdout, stdout


def _main(*argv: str) -> int:
    """``ckpt-wrapper ARGV`` in this process (a one-rank group, not torchrun), targets importable."""
    import sys

    from ckpt_wrapper.tools.cli import main

    sys.path.insert(0, _here())
    try:
        return main(list(argv))
    finally:
        sys.path.remove(_here())


def test_parity_command_uses_the_models_loss_and_user_callables_in_one_process(capsys, monkeypatch):
    """Without torchrun (no RANK): inputs with ``labels`` train on the model's own ``output.loss``;
    ``--forward`` and ``--loss`` replace the call and the loss; the summary says plainly that one rank, not
    started by torchrun, took part, and ``--min-ranks 2`` turns that into exit status 1.

    Failed before: ModelOutput outputs raised AttributeError, and no flag selected the logits or the loss.
    """
    pytest.importorskip("transformers")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    base = ["parity", "--model", "parity_targets:llama", "--blocks", "LlamaDecoderLayer", "--parallel", "none",
            "--steps", "2"]
    assert _main(*base, "--batch-fn", "parity_targets:llama_labelled_batch") == 0
    out = capsys.readouterr().out
    assert ": OK" in out and "not started by torchrun" in out and "exit status 0" in out, out

    import parity_targets

    calls = []
    monkeypatch.setattr(parity_targets, "loss_of", lambda o, t: calls.append(type(o)) or
                        torch.nn.functional.cross_entropy(o.flatten(0, -2), t.flatten()))
    assert _main(*base, "--forward", "parity_targets:logits_of", "--loss", "parity_targets:loss_of",
                 "--min-ranks", "2") == 1
    out = capsys.readouterr().out
    assert ": OK" in out and "expected at least 2 ranks (--min-ranks 2), found 1: exit status 1" in out, out
    assert calls and set(calls) == {torch.Tensor}, calls  # the user's forward's output, as it returned it


def _plan_entries(path: pathlib.Path, **changes: str) -> None:
    data = json.loads(path.read_text())
    for entry in data["entries"]:
        entry["name"] = changes.get(entry["name"], entry["name"])
    path.write_text(json.dumps(data))


def test_saved_plan_feeds_parity_plan(pool2, tmp_path, capsys, monkeypatch):
    """End to end: ``ckpt-wrapper plan --out`` saves a plan that ``parity --plan`` applies on 2 ranks and
    passes; a plan naming a block the model lacks is exit status 2 with one line naming it.

    Failed before: there was no ``plan`` subcommand and no ``--plan`` flag.
    """
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    plan = tmp_path / "plan.json"
    assert _main("plan", "--memory-budget", "0.3", "--cost", "flops", "--measure", "saved", "--out", str(plan)) == 0
    assert "saved the plan" in capsys.readouterr().out
    stdout = _parity_in_pool(pool2, "--plan", str(plan), "--parallel", "ddp", "--ac-order", "after")  # under DDP's module.
    assert "parity OK on 2 ranks" in stdout, stdout
    assert _main("parity", "--plan", str(plan), "--parallel", "fsdp2", "--steps", "1") == 0  # units: planned classes
    assert "parity OK on 1 rank only" in capsys.readouterr().out

    _plan_entries(plan, **{"layers.3": "layers.9"})
    assert _main("parity", "--plan", str(plan), "--parallel", "none", "--steps", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names block(s) layers.9, which GPT does not have" in err[0] and "fix:" in err[0], err


def test_parity_command_refuses_plan_and_ac_together(capsys):
    """--plan with --ac offload is a usage error (exit 2, one line), not a silent choice of one. No ranks."""
    with pytest.raises(SystemExit) as exit_info:
        _main("parity", "--plan", "p.json", "--ac", "offload")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--plan applies the plan's strategies" in err[0], err


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
