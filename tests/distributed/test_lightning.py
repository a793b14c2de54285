"""Lightning integration: real ``Trainer.fit`` runs, checkpointed and not, give the same training.

The multi-process test runs this file itself under torchrun (2 CPU processes, gloo; Lightning sees the
torchrun environment and starts no processes of its own) and fits, in one launch: DDP with the
callback and a plan, ``ModelParallelStrategy`` (FSDP2 in ``configure_model``) with ``apply_checkpointing``
and a selective policy, and ``ModelParallelStrategy`` with the callback and offload on every other
block, each against the same fit without checkpointing, with dropout on. ``FSDPStrategy`` (FSDP1)
refuses CPU in Lightning 2.6, so its fit runs only where CUDA is.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pool import launch_report, print_report

pytestmark = pytest.mark.timeout(420)

HERE = Path(__file__).resolve()
CONFIG = dict(n_layer=3, d_model=32, n_head=4, seq_len=16, vocab_size=64, dropout=0.1)
STEPS = 3




# --- in-process ---------------------------------------------------------------------------------------------


def test_fsdp_strategy_checkpointing_is_refused_and_its_policy_gives_the_blocks() -> None:
    """A real ``FSDPStrategy``: its own ``activation_checkpointing_policy`` is refused (it would wrap our blocks
    again), and without ``check_fn`` the blocks are those its ``auto_wrap_policy`` shards.

    A failure means blocks get recomputed twice, or the default selection differs from Lightning's sharding.
    """
    pytest.importorskip("lightning")
    from lightning.pytorch.strategies import FSDPStrategy

    from ckpt_wrapper.integrations import lightning as integration
    from ckpt_wrapper.testing.models import GPT, Block, GPTConfig

    with pytest.raises(ValueError, match="activation_checkpointing_policy"):
        integration._refuse_strategy_checkpointing(FSDPStrategy(activation_checkpointing_policy={Block}))
    strategy = FSDPStrategy(auto_wrap_policy={Block})
    integration._refuse_strategy_checkpointing(strategy)
    model = GPT(GPTConfig(n_layer=2, d_model=16, n_head=2, seq_len=8, vocab_size=32))
    wrapped = integration.checkpoint_blocks(model, where="lightning", check_fn=None, plan=None, checkpoint_wrapper_fn=None,
                                            checkpoint_options={}, auto_wrap_policy=integration._strategy_policy(strategy))
    assert wrapped == ["layers.0", "layers.1"]
    # The policy FSDP1 shards with still makes each checkpointed block a unit (FSDP runs _run_policy to choose).
    targets = integration._strategy_policy(strategy)._run_policy(model, set(), {})
    assert {name for name, m in model.named_modules() if m in targets} >= {"layers.0", "layers.1"}, targets


def test_missing_lightning_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Lightning, the module imports (doctest collection does) and the callback's ImportError says what
    to install. A failure means users get a bare ModuleNotFoundError, or importing the module needs Lightning."""
    from ckpt_wrapper.integrations import lightning as integration

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    integration._callback_class.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'lightning"):
            integration.CheckpointingCallback
    finally:
        integration._callback_class.cache_clear()


def test_refusals_of_what_would_change_training() -> None:
    """``preserve_rng_state=False``, no selection and a plan mixed with options are refused.

    A failure means the integration silently trains something other than the unwrapped model.
    """
    from ckpt_wrapper.integrations.lightning import apply_checkpointing
    from ckpt_wrapper.testing.models import GPT, GPTConfig
    from ckpt_wrapper import by_class_name

    model = GPT(GPTConfig(n_layer=2, d_model=16, n_head=2, seq_len=8, vocab_size=32))
    with pytest.raises(ValueError, match="preserve_rng_state=False"):
        apply_checkpointing(model, check_fn=by_class_name("Block"), preserve_rng_state=False)
    with pytest.raises(ValueError, match="say which blocks"):
        apply_checkpointing(model)
    with pytest.raises(TypeError, match="plan alone"):
        apply_checkpointing(model, plan="plan.json", offload=True)


@pytest.mark.slow
def test_two_cpu_processes_fit_ddp_and_model_parallel() -> None:
    """``Trainer.fit`` on 2 CPU processes: DDP and ModelParallelStrategy, checkpointed vs not, bitwise equal.

    Per fit: every step's gradients, the final parameters, buffers and optimizer state equal the fit
    without checkpointing; the blocks named are wrapped; the saved Lightning checkpoint holds the plain
    names. A failure names the scenario, with every rank's traceback.
    """
    pytest.importorskip("lightning")
    report = launch_report(2, str(HERE), "cpu")
    assert report["ddp_plan"]["wrapped"] and len(report["ddp_plan"]["strategies"]) == 3, report
    assert report["mp_selective"]["wrapped"] == ["layers.0", "layers.1", "layers.2"], report
    assert report["mp_offload"]["wrapped"] == ["model.layers.0", "model.layers.2"], report
    assert report["mp_offload"]["fsdp_units"] == 4, report  # 3 blocks + the root, as without checkpointing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Lightning 2.6's FSDPStrategy refuses accelerator='cpu'")
def test_fsdp_strategy_fit_on_gpu() -> None:
    """``FSDPStrategy(auto_wrap_policy={Block})`` with the callback (blocks from the policy) trains like without it.

    Float tolerances: GPU kernels may reduce in another order between forward and recompute.
    """
    pytest.importorskip("lightning")
    report = launch_report(1, str(HERE), "fsdp")
    assert report["fsdp"]["wrapped"] == ["model.layers.0", "model.layers.1", "model.layers.2"], report


# --- the fits, run on every process of the launched job ------------------------------------------------------


def _module_class():
    import lightning.pytorch as pl

    from ckpt_wrapper.testing.data import lm_loss
    from ckpt_wrapper.testing.models import GPT, GPTConfig

    class LitGPT(pl.LightningModule):
        """The toy GPT as a LightningModule; ``shard`` makes FSDP2 units in ``configure_model``."""

        def __init__(self, shard: bool = False, checkpoint=None) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(GPTConfig(**CONFIG))
            self.shard, self.checkpoint = shard, checkpoint

        def configure_model(self) -> None:
            if not self.shard:
                return
            from torch.distributed.fsdp import fully_shard

            if self.checkpoint is not None:  # checkpoint, then shard: the documented order
                self.wrapped = self.checkpoint(self.model)
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model(tokens)

        def training_step(self, batch, batch_idx):
            tokens = batch[0]
            return lm_loss(self.model(tokens[:, :-1]), tokens[:, 1:])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return LitGPT


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone().cpu()


def _fit(strategy, module, callbacks=(), checkpoint_path: str | None = None) -> dict:
    """Fit ``module`` for STEPS steps; record each step's gradients, then parameters, buffers, optimizer state."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    grads: list[dict[str, torch.Tensor]] = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append({n: _local(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})

    tokens = torch.randint(0, CONFIG["vocab_size"], (4 * STEPS, CONFIG["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(tokens), batch_size=2, shuffle=False)
    from lightning.pytorch.strategies import FSDPStrategy

    accelerator = "cuda" if isinstance(strategy, FSDPStrategy) else "cpu"  # Lightning 2.6 refuses FSDPStrategy on CPU
    trainer = pl.Trainer(accelerator=accelerator, devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, max_steps=STEPS,
                         callbacks=[*callbacks, Record()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    torch.manual_seed(100 + int(os.environ["RANK"]))  # each rank's dropout stream, equal across fits
    trainer.fit(module, loader)
    optimizer = trainer.optimizers[0]
    state = {f"{i}.{k}": _local(v) for i, p in enumerate(optimizer.param_groups[0]["params"])
             for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
    saved = None
    if checkpoint_path is not None:
        trainer.save_checkpoint(checkpoint_path)
        trainer.strategy.barrier()
        saved = list(torch.load(checkpoint_path, weights_only=False)["state_dict"]) if trainer.global_rank == 0 else None
    return {"grads": grads, "state": {k: _local(v) for k, v in module.state_dict().items()}, "optim": state,
            "saved": saved, "trainer": trainer}


def _same(got: dict, expected: dict, what: str, exact: bool = True) -> None:
    tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {}
    assert len(got["grads"]) == len(expected["grads"]) == STEPS, f"{what}: {len(got['grads'])} steps recorded"
    for step, (a, b) in enumerate(zip(got["grads"], expected["grads"])):
        assert a.keys() == b.keys() and a, f"{what} step {step}: gradient names {sorted(a)} vs {sorted(b)}"
        for name in a:
            torch.testing.assert_close(a[name], b[name], **tolerance, msg=lambda m: f"{what} step {step} grad {name}: {m}")
    for kind in ("state", "optim"):
        assert got[kind].keys() == expected[kind].keys() and got[kind], f"{what}: {kind} names differ"
        for name in got[kind]:
            torch.testing.assert_close(got[kind][name], expected[kind][name], **tolerance,
                                       msg=lambda m: f"{what} {kind} {name}: {m}")


def scenarios(kind: str, folder: str) -> dict:
    """Every fit of the launched job; returns the report rank 0 prints."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    import ckpt_wrapper
    from ckpt_wrapper import ActivationWrapper, OffloadWrapper, by_class_name, every_nth, selective_context_fn
    from ckpt_wrapper.integrations.lightning import CheckpointingCallback, apply_checkpointing
    from ckpt_wrapper.testing.models import Block

    LitGPT = _module_class()
    blocks = by_class_name("Block")
    report: dict = {}
    path = functools.partial(os.path.join, folder)  # Lightning writes checkpoints from rank 0 only

    if kind == "fsdp":
        def fsdp():
            return FSDPStrategy(auto_wrap_policy={Block})
        reference = _fit(fsdp(), LitGPT())
        callback = CheckpointingCallback()  # the blocks FSDPStrategy's auto_wrap_policy shards
        ours = _fit(fsdp(), LitGPT(), [callback])
        _same(ours, reference, "FSDPStrategy", exact=False)
        report["fsdp"] = {"wrapped": callback.wrapped}
        return report

    # DDP, blocks wrapped as a plan says (rank 0 plans, every rank applies the same plan).
    reference = _fit(DDPStrategy(process_group_backend="gloo"), LitGPT(), checkpoint_path=path("plain.ckpt"))
    module = LitGPT()
    plan = ckpt_wrapper.plan(module, torch.randint(0, 64, (2, 16)), memory_budget=0.4, check_fn=blocks,
                             measure="saved", cost="flops")
    callback = CheckpointingCallback(plan=plan)
    ours = _fit(DDPStrategy(process_group_backend="gloo"), module, [callback], checkpoint_path=path("ours.ckpt"))
    _same(ours, reference, "DDP with a plan")
    planned = [e.name for e in plan.entries if str(e.strategy) != "none"]
    assert callback.wrapped and all(any(n == p or n.startswith(p + ".") for p in planned) for n in callback.wrapped), \
        (callback.wrapped, [str(e.strategy) for e in plan.entries])
    assert all(isinstance(module.get_submodule(n), ActivationWrapper) for n in callback.wrapped)
    if ours["saved"] is not None:
        assert ours["saved"] == reference["saved"] == list(reference["state"]), "checkpoint names changed"
    report["ddp_plan"] = {"wrapped": callback.wrapped, "strategies": [str(e.strategy) for e in plan.entries]}
    # Sensitivity: without RNG preservation the recompute draws other dropout masks, and the comparison sees it.
    no_rng = functools.partial(ckpt_wrapper.checkpoint_wrapper, preserve_rng_state=False)
    control = _fit(DDPStrategy(process_group_backend="gloo"), LitGPT(), [CheckpointingCallback(check_fn=blocks, checkpoint_wrapper_fn=no_rng)])
    try:
        _same(control, reference, "control")
    except AssertionError:
        pass
    else:
        raise AssertionError("a fit without RNG preservation matched the reference: dropout is not exercised")

    # ModelParallelStrategy: apply_checkpointing in configure_model (titan's selective policy), then fully_shard.
    def mp():
        return ModelParallelStrategy(data_parallel_size=int(os.environ["WORLD_SIZE"]), tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    reference = _fit(mp(), LitGPT(shard=True), checkpoint_path=path("plain_mp.ckpt"))
    selective = lambda model: apply_checkpointing(model, check_fn=blocks, context_fn=selective_context_fn("titan"))  # noqa: E731
    module = LitGPT(shard=True, checkpoint=selective)
    ours = _fit(mp(), module, checkpoint_path=path("ours_mp.ckpt"))
    _same(ours, reference, "ModelParallelStrategy, selective")
    if ours["saved"] is not None:
        assert ours["saved"] == reference["saved"] == list(reference["state"]), "checkpoint names changed"
    report["mp_selective"] = {"wrapped": module.wrapped}

    # ModelParallelStrategy with the callback: offload (real copies on CPU) on every other block.
    callback = CheckpointingCallback(check_fn=every_nth(2, blocks), checkpoint_wrapper_fn=lambda b: ckpt_wrapper.offload_wrapper(b, cpu_copy=True))
    module = LitGPT(shard=True)
    ours = _fit(mp(), module, [callback])
    _same(ours, reference, "ModelParallelStrategy, callback + offload")
    from torch.distributed.fsdp import FSDPModule

    assert isinstance(module.model.layers[0], OffloadWrapper) and not isinstance(module.model.layers[1], OffloadWrapper)
    report["mp_offload"] = {"wrapped": callback.wrapped, "fsdp_units": sum(isinstance(m, FSDPModule) for m in module.modules())}
    return report


def _main(kind: str) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # The group exists before the first fit, so the plan (a collective) can run; Lightning reuses it.
    dist.init_process_group("nccl" if kind == "fsdp" else "gloo")
    with tempfile.TemporaryDirectory() as folder:
        report = scenarios(kind, folder)
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
