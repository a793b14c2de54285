"""HF Trainer integration: ``use_ckpt_wrapper(trainer)`` then ``trainer.train()`` trains like no checkpointing.

The multi-process test runs this file under torchrun (2 CPU processes, gloo): a real ``Trainer.train`` on
a Llama built from a ``LlamaConfig`` (no download, attention dropout on), once plain and once through
``use_ckpt_wrapper``, under the Trainer's DDP. On CPU, accelerate drops the Trainer's FSDP plugin (it
needs an accelerator), so the FSDP run is a GPU test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pool import launch_report, print_report

pytestmark = pytest.mark.timeout(420)

HERE = Path(__file__).resolve()
STEPS = 3




def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                                        use_cache=False))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.tokens = torch.randint(0, 64, (4 * STEPS, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def _trainer(output_dir: str, **overrides):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=output_dir, use_cpu=not torch.cuda.is_available(), per_device_train_batch_size=2,
                max_steps=STEPS, learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", report_to=[],
                logging_strategy="no", save_strategy="no", seed=7, dataloader_num_workers=0, disable_tqdm=True,
                ddp_find_unused_parameters=False)
    if "WORLD_SIZE" in os.environ and not torch.cuda.is_available():  # under torchrun; in-process: one process
        args["ddp_backend"] = "gloo"
    args.update(overrides)
    return Trainer(model=_llama(), args=TrainingArguments(**args), train_dataset=_Tokens())


# --- in-process ---------------------------------------------------------------------------------------------


def test_hf_checkpointing_at_the_same_time_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A real Trainer with ``gradient_checkpointing=True`` is refused, naming the argument to turn off; so is
    one where it is turned on after ``use_ckpt_wrapper`` (at ``train()``), and a model with HF's enabled.

    A failure means every layer could be recomputed twice without a word.
    """
    pytest.importorskip("transformers")
    from ckpt_wrapper.integrations.hf_trainer import use_ckpt_wrapper

    trainer = _trainer(str(tmp_path), gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing=False"):
        use_ckpt_wrapper(trainer)
    trainer = _trainer(str(tmp_path))
    assert use_ckpt_wrapper(trainer) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    trainer.args.gradient_checkpointing = trainer.args.activation_checkpointing = True
    with pytest.raises(ValueError, match="gradient_checkpointing=False"):
        trainer.train()
    trainer = _trainer(str(tmp_path))
    trainer.model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        use_ckpt_wrapper(trainer)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        use_ckpt_wrapper(trainer.model)


@pytest.mark.slow
def test_two_cpu_processes_train_like_without_checkpointing() -> None:
    """``Trainer.train`` on 2 CPU processes (DDP): losses, every step's gradients, final parameters and optimizer
    state bitwise equal to the same training without checkpointing; ``save_model`` writes the plain names.

    A failure names what differed, with every rank's traceback.
    """
    pytest.importorskip("transformers")
    report = launch_report(2, str(HERE), "cpu")
    assert report["ddp"]["wrapped"] == ["model.layers.0", "model.layers.1", "model.layers.2"], report
    assert report["ddp_every_2_offload"]["wrapped"] == ["model.layers.0", "model.layers.2"], report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: accelerate uses the Trainer's FSDP plugin only on accelerators")
def test_trainer_fsdp_on_gpu() -> None:
    """The Trainer's FSDP (``fsdp="full_shard"``, versions 1 and 2 through accelerate) with ``use_ckpt_wrapper``
    trains like without it (float tolerances), every layer its own FSDP unit."""
    pytest.importorskip("transformers")
    report = launch_report(1, str(HERE), "fsdp")
    assert report["fsdp2"]["wrapped"] == ["model.layers.0", "model.layers.1", "model.layers.2"], report


# --- the trainings, run on every process of the launched job -------------------------------------------------


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone().cpu()


def _train(output_dir: str, wrap=None, **overrides) -> dict:
    from transformers import TrainerCallback

    trainer = _trainer(output_dir, **overrides)
    grads: list[dict[str, torch.Tensor]] = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.append({n: _local(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.add_callback(Record())
    wrapped = wrap(trainer) if wrap is not None else []
    result = trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    state = {f"{i}.{k}": _local(v) for i, p in enumerate(optimizer.param_groups[0]["params"])
             for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
    trainer.save_model(output_dir)
    return {"grads": grads, "params": {k: _local(v) for k, v in trainer.model.state_dict().items()}, "optim": state,
            "loss": result.training_loss, "wrapped": wrapped, "trainer": trainer}


def _same(got: dict, expected: dict, what: str, exact: bool) -> None:
    tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {}
    assert got["loss"] == expected["loss"] if exact else abs(got["loss"] - expected["loss"]) < 1e-4, \
        f"{what}: loss {got['loss']} vs {expected['loss']}"
    assert len(got["grads"]) == len(expected["grads"]) == STEPS, f"{what}: {len(got['grads'])} steps recorded"
    for step, (a, b) in enumerate(zip(got["grads"], expected["grads"])):
        assert a.keys() == b.keys() and a, f"{what} step {step}: gradient names differ"
        for name in a:
            torch.testing.assert_close(a[name], b[name], **tolerance, msg=lambda m: f"{what} step {step} grad {name}: {m}")
    for kind in ("params", "optim"):
        assert got[kind].keys() == expected[kind].keys(), f"{what}: {kind} names differ"
        for name in got[kind]:
            torch.testing.assert_close(got[kind][name], expected[kind][name], **tolerance,
                                       msg=lambda m: f"{what} {kind} {name}: {m}")


def _saved_names(directory: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as handle:
        return sorted(handle.keys())


def scenarios(kind: str, folder: str) -> dict:
    """Every training of the launched job; returns the report rank 0 prints."""
    import functools

    import ckpt_wrapper
    from ckpt_wrapper import by_class_name, every_nth
    from ckpt_wrapper.integrations.hf_trainer import use_ckpt_wrapper

    report: dict = {}
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if kind == "fsdp":
        for version in (1, 2):
            fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": version, "activation_checkpointing": False})
            reference = _train(os.path.join(folder, f"plain{version}"), **fsdp)
            ours = _train(os.path.join(folder, f"ours{version}"), use_ckpt_wrapper, **fsdp)
            _same(ours, reference, f"FSDP{version}", exact=False)
            report[f"fsdp{version}"] = {"wrapped": ours["wrapped"]}
        return report

    reference = _train(os.path.join(folder, "plain"))
    ours = _train(os.path.join(folder, "ours"), use_ckpt_wrapper)
    _same(ours, reference, "DDP", exact=True)
    assert all(isinstance(layer, ckpt_wrapper.CheckpointWrapper) for layer in ours["trainer"].model.model.layers)
    if rank0:
        assert _saved_names(os.path.join(folder, "ours")) == _saved_names(os.path.join(folder, "plain")), "saved names changed"
    report["ddp"] = {"wrapped": ours["wrapped"]}

    every_2 = functools.partial(use_ckpt_wrapper, check_fn=every_nth(2, by_class_name("LlamaDecoderLayer")),
                                offload=ckpt_wrapper.OffloadOptions(cpu_copy=True))
    ours = _train(os.path.join(folder, "every_2"), every_2)
    _same(ours, reference, "DDP, every 2nd layer offloaded", exact=True)
    report["ddp_every_2_offload"] = {"wrapped": ours["wrapped"]}

    # Sensitivity: without RNG preservation attention dropout differs in the recompute, and the comparison sees it.
    no_rng = functools.partial(use_ckpt_wrapper, checkpoint_wrapper_fn=functools.partial(
        ckpt_wrapper.checkpoint_wrapper, preserve_rng_state=False))
    control = _train(os.path.join(folder, "control"), no_rng)
    try:
        _same(control, reference, "control", exact=True)
    except AssertionError:
        pass
    else:
        raise AssertionError("training without RNG preservation matched the reference: dropout is not exercised")
    return report


def _main(kind: str) -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        report = scenarios(kind, folder)
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
