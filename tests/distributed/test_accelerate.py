"""accelerate integration: checkpoint before ``prepare``, and accelerate still shards the blocks as usual.

The multi-process tests launch this file itself as the training script (``python test_accelerate.py
SCENARIO`` on every process): on CPU through ``accelerate launch --multi_gpu --num_processes 2`` (with
``Accelerator(cpu=True)`` that is accelerate's multi-process CPU path: gloo, DDP), on a GPU through
torchrun with one process and accelerate's real FSDP plugin.

accelerate enables its FSDP plugin only on accelerators. Its FSDP code (plugin resolution of
``transformer_cls_names_to_wrap``, ``FSDP(...)``, ``fully_shard`` per block) runs on CPU with gloo all
the same, so the CPU scenario also forces the accelerator's state to FSDP to run those paths in CI
(``_force_fsdp``); the GPU test runs them unforced.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pool import _free_port, print_report, read_report, torchrun

pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).resolve()
REPO_ROOT = HERE.parents[2]
LAUNCH = REPO_ROOT / "scripts" / "launch"


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    # Every rank writes to the same two streams; tracebacks are prefixed by accelerate/torchrun per rank.
    return f"exit status {result.returncode}\n--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-12000:]}"


def _accelerate_launch(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    """``accelerate launch ARGS`` on a free port, one OpenMP thread per process, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env,
                          stdin=subprocess.DEVNULL)


# --- in-process --------------------------------------------------------------------------------------------


def test_missing_accelerate_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without accelerate, the integration's functions raise ImportError naming the extra to install.

    A failure means users get a bare ModuleNotFoundError (or worse, importing ckpt_wrapper needs accelerate).
    """
    from ckpt_wrapper.integrations import accelerate as integration

    monkeypatch.setitem(sys.modules, "accelerate", None)  # makes `import accelerate` fail
    with pytest.raises(ImportError, match=r"pip install 'accelerate>=1\.6'.*\[accelerate\]"):
        integration.apply_checkpointing(object(), torch.nn.Linear(2, 2))


def test_blocks_default_to_no_split_modules_and_otherwise_must_be_named() -> None:
    """Without an FSDP plugin, the default blocks are the model's ``_no_split_modules``; with none, an error.

    Uses a stand-in accelerator in a single-process state (no process group). A failure means the default
    selection silently wraps nothing, or wraps something the user did not ask for.
    """
    pytest.importorskip("accelerate")
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ckpt_wrapper.integrations.accelerate import apply_checkpointing, block_class_names
    from ckpt_wrapper.testing.models import GPT, GPTConfig

    accelerator = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.NO))
    model = GPT(GPTConfig(n_layer=2, d_model=16, n_head=2, seq_len=8, vocab_size=32))
    with pytest.raises(ValueError, match="Pass check_fn"):
        apply_checkpointing(accelerator, model)
    model._no_split_modules = ["Block"]  # what an HF model declares
    assert block_class_names(accelerator, model) == ["Block"]
    assert apply_checkpointing(accelerator, model) == ["layers.0", "layers.1"]
    with pytest.raises(TypeError, match="expected an accelerate.Accelerator"):
        apply_checkpointing(object(), model)


@pytest.mark.parametrize("config", ["accelerate_fsdp1.yaml", "accelerate_fsdp2.yaml"])
def test_accelerate_config_files_configure_fsdp_without_its_checkpointing(
        config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch configs become, through accelerate's launcher, the FSDP plugin they promise.

    The environment ``accelerate launch --config_file`` gives each process is built with accelerate's own
    functions, and the plugin is constructed from it as ``Accelerator()`` would. A failure means the
    config would start another FSDP version, wrap blocks other than the model's ``_no_split_modules``,
    or turn on accelerate's own checkpointing (which ``apply_checkpointing`` then refuses).
    """
    pytest.importorskip("accelerate")
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    args = launch_command_parser().parse_args(["--config_file", str(LAUNCH / config), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == int(config[-6])
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None  # blocks come from the model's _no_split_modules
    assert plugin.activation_checkpointing is False


# --- multi-process ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_cpu_processes_through_accelerate_launch() -> None:
    """Under ``accelerate launch`` (2 CPU processes): DDP, and accelerate's FSDP1/FSDP2 code, forced on CPU.

    Checks, with dropout on: losses and gradients bitwise equal to the same accelerate setup without
    checkpointing; every block still an FSDP unit, including blocks left unwrapped; state-dict names
    unchanged; accelerate's own checkpointing refused; RNG preservation kept. A failure names the
    scenario; the output holds every rank's traceback.
    """
    pytest.importorskip("accelerate")
    result = _accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE), "cpu")
    report = read_report(result, _explain(result))  # rank 0 alone reports
    assert report["ddp"]["wrapped"] == ["layers.0", "layers.1", "layers.2"], report
    assert report["fsdp2"]["units"] == 5 and report["fsdp1_every_2"]["units"] == 4, report  # 3 blocks + tail/root


@pytest.mark.slow
def test_train_script_under_accelerate_fsdp2_config() -> None:
    """``accelerate launch --config_file accelerate_fsdp2.yaml train_driver.py --parallel accelerate`` trains.

    On a CPU-only machine accelerate runs DDP (its FSDP plugin needs an accelerator); the checkpointed
    blocks go through ``apply_checkpointing`` either way. A failure means the documented command is broken.
    """
    pytest.importorskip("accelerate")
    result = _accelerate_launch(
        "--config_file", str(LAUNCH / "accelerate_fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
        str(LAUNCH / "train_driver.py"), "--parallel", "accelerate", "--steps", "2", "--n-layer", "2", "--d-model", "32",
        "--n-head", "4", "--seq-len", "16", "--vocab-size", "64", "--batch", "2", "--progress", "lines",
    )
    assert result.returncode == 0, _explain(result)
    assert "checkpointing                       full: 2 block(s) wrapped" in result.stdout, _explain(result)
    assert result.stdout.count("summary") == 1, _explain(result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_plugin_on_gpu_one_process() -> None:
    """accelerate's real FSDP plugin (versions 1 and 2) on one GPU process finds and shards the blocks.

    The same checks as the CPU scenario, unforced, with float tolerances (GPU kernels may reduce in
    another order between forward and recompute).
    """
    pytest.importorskip("accelerate")
    result = torchrun(1, str(HERE), "gpu", env={"PYTHONPATH": str(REPO_ROOT)})
    report = read_report(result, _explain(result))
    assert report["fsdp2"]["units"] == 5 and report["fsdp1_every_2"]["units"] == 4, report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", ["accelerate_fsdp1.yaml", "accelerate_fsdp2.yaml"])
def test_train_script_under_fsdp_config_on_gpu(config: str) -> None:
    """train_driver.py under each accelerate config on one GPU process: accelerate's FSDP plugin, bf16, checkpointing.

    A failure means the documented GPU command is broken (the plugin cannot find the driver's blocks, say).
    """
    pytest.importorskip("accelerate")
    result = _accelerate_launch(
        "--config_file", str(LAUNCH / config), "--num_processes", "1", str(LAUNCH / "train_driver.py"),
        "--parallel", "accelerate", "--steps", "2", "--n-layer", "2", "--d-model", "64", "--n-head", "4",
        "--seq-len", "32", "--vocab-size", "128", "--progress", "lines",
    )
    assert result.returncode == 0, _explain(result)
    assert "accelerate FSDP" in result.stdout and "full: 2 block(s) wrapped" in result.stdout, _explain(result)


# --- the scenarios, run on every process of a launched job -------------------------------------------------


def _gpt():
    from ckpt_wrapper.testing.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16, vocab_size=64, dropout=0.1))


def _force_fsdp(accelerator, plugin) -> None:
    """Make accelerate take its FSDP paths on CPU (it keeps the plugin only on accelerators)."""
    from accelerate.utils import DistributedType

    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.device = torch.device("cpu")  # FSDP1 rejects accelerate's "cpu:0" as its device_id


def _accelerator(plugin, force: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # a fresh configuration per scenario; the process group stays
    GradientState._reset_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if plugin is not None and force:
        _force_fsdp(accelerator, plugin)
    return accelerator


def _plugin(version: int, **options):
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=["Block"], **options)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone().cpu()


def _units(model) -> int:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return sum(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _train(version: int | None, wrap, *, force: bool, steps: int = 2) -> dict:
    """Prepare a fresh GPT with accelerate (FSDP ``version`` or DDP), ``wrap(accelerator, model)`` first."""
    import torch.nn.functional as F

    accelerator = _accelerator(_plugin(version) if version else None, force)
    model = _gpt()
    wrapped = wrap(accelerator, model) if wrap is not None else []
    names = [name for name, _ in model.named_parameters()]
    if accelerator.is_fsdp2:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    torch.manual_seed(100 + accelerator.process_index)  # each process's dropout stream, equal across runs
    rows = slice(2 * accelerator.process_index, 2 * accelerator.process_index + 2)
    losses, grads = [], []
    for step in range(steps):
        tokens = torch.randint(0, 64, (2 * accelerator.num_processes, 17), generator=torch.Generator().manual_seed(step))
        tokens = tokens[rows].to(accelerator.device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        accelerator.backward(loss)
        losses.append(loss.item())
        grads.append([_local(p.grad) for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad()
    state_names = list(accelerator.get_state_dict(model)) if version is None else None
    return {"losses": losses, "grads": grads, "wrapped": wrapped, "units": _units(model), "names": names,
            "state_names": state_names, "model": model, "accelerator": accelerator}


def _same(got: dict, expected: dict, exact: bool, what: str) -> None:
    rtol, atol = (0.0, 0.0) if exact else (1e-5, 1e-6)
    torch.testing.assert_close(got["losses"], expected["losses"], rtol=rtol, atol=atol, msg=lambda m: f"{what} losses: {m}")
    for step, (a, b) in enumerate(zip(got["grads"], expected["grads"])):
        assert len(a) == len(b) and a, f"{what}: step {step} has {len(a)} gradients, the reference {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what} step {step} grad {i}: {m}")


def _raises(fn, match: str) -> str:
    try:
        fn()
    except ValueError as error:
        assert match in str(error), f"expected {match!r} in: {error}"
        return str(error)
    raise AssertionError(f"expected ValueError matching {match!r}")


def scenarios(device_kind: str) -> dict:
    """Every check, on every process; returns a small report (rank 0 prints it)."""
    from ckpt_wrapper import CheckpointWrapper, apply_activation_checkpointing, by_class_name, checkpoint_wrapper, every_nth
    from ckpt_wrapper.integrations.accelerate import apply_checkpointing

    force, exact = device_kind == "cpu", device_kind == "cpu"
    report: dict = {}
    block = by_class_name("Block")

    if device_kind == "cpu":  # DDP: accelerate's multi-process CPU path
        reference = _train(None, None, force=False)
        ours = _train(None, lambda acc, m: apply_checkpointing(acc, m, check_fn=block), force=False)
        _same(ours, reference, exact, "DDP")
        assert ours["state_names"] == reference["state_names"] == ours["names"], "state-dict names changed"
        report["ddp"] = {"wrapped": ours["wrapped"]}
        # Sensitivity: without RNG preservation dropout differs in the recompute, so gradients change.
        no_rng = functools.partial(checkpoint_wrapper, preserve_rng_state=False)
        control = _train(None, lambda acc, m: apply_activation_checkpointing(m, checkpoint_wrapper_fn=no_rng, check_fn=block),
                         force=False)
        try:
            _same(control, reference, exact, "control")
        except AssertionError:
            pass
        else:
            raise AssertionError("gradients without RNG preservation matched: dropout is not exercised")
        _raises(lambda: apply_checkpointing(_accelerator(None, False), _gpt(), check_fn=block, preserve_rng_state=False),
                "preserve_rng_state=False")
        prepared = reference["accelerator"], reference["model"]
        _raises(lambda: apply_checkpointing(*prepared, check_fn=block), "before accelerator.prepare")
        _hf_model_default_blocks(report)

    # FSDP2: every block checkpointed; default selection = the plugin's transformer_cls_names_to_wrap.
    reference = _train(2, None, force=force)
    ours = _train(2, lambda acc, m: apply_checkpointing(acc, m), force=force)
    _same(ours, reference, exact, "FSDP2")
    assert ours["units"] == reference["units"] == 5, (ours["units"], reference["units"])  # 3 blocks, tail, root
    assert all(isinstance(b, CheckpointWrapper) for b in ours["model"].layers)
    report["fsdp2"] = {"units": ours["units"], "wrapped": ours["wrapped"]}
    # FSDP2 with the first block checkpointed and others not: refused, model left as it was.
    model = _gpt()
    _raises(lambda: apply_checkpointing(_accelerator(_plugin(2), force), model, check_fn=every_nth(2, block)), "offset=1")
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules()), "the refused call left blocks wrapped"
    shifted = _train(2, lambda acc, m: apply_checkpointing(acc, m, check_fn=every_nth(2, block, offset=1)), force=force)
    assert shifted["wrapped"] == ["layers.1"] and shifted["units"] == 5, (shifted["wrapped"], shifted["units"])
    _same(shifted, reference, exact, "FSDP2 every 2nd block")

    # FSDP1: any selection works (the plugin's class names are resolved to the blocks' own classes).
    reference = _train(1, None, force=force)
    ours = _train(1, lambda acc, m: apply_checkpointing(acc, m, check_fn=every_nth(2, block)), force=force)
    assert ours["wrapped"] == ["layers.0", "layers.2"]
    assert ours["units"] == reference["units"] == 4, (ours["units"], reference["units"])  # 3 blocks + root
    _same(ours, reference, exact, "FSDP1 every 2nd block")
    report["fsdp1_every_2"] = {"units": ours["units"], "wrapped": ours["wrapped"]}

    # accelerate's own checkpointing on: refused, naming the setting to turn off.
    stacked = _accelerator(_plugin(2, activation_checkpointing=True), force)
    _raises(lambda: apply_checkpointing(stacked, _gpt()), "fsdp_activation_checkpointing: false")
    return report


def _hf_model_default_blocks(report: dict) -> None:
    """An HF Llama: with no check_fn, the blocks are the model's _no_split_modules; names survive prepare."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        report["llama"] = "skipped: transformers not installed"
        return
    from ckpt_wrapper.integrations.accelerate import apply_checkpointing

    accelerator = _accelerator(None, False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, use_cache=False))
    names = list(model.state_dict())
    assert apply_checkpointing(accelerator, model) == ["model.layers.0", "model.layers.1"]
    model = accelerator.prepare(model)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
    assert list(accelerator.get_state_dict(model)) == names
    report["llama"] = "ok"


def _main(device_kind: str) -> int:
    torch.set_num_threads(1)
    report = scenarios(device_kind)
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
