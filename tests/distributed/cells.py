"""Tasks the rank pool runs: one parity cell each, on the built-in GPT, through the public harness."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ckpt_wrapper import CheckpointImpl, apply_activation_checkpointing, by_class_name, checkpoint_wrapper, offload_wrapper
from ckpt_wrapper.testing.recipes import ShardRecipe
from ckpt_wrapper.testing.models import GPT, Block, GPTConfig
from ckpt_wrapper.testing import ParityConfig, check_parity

SMALL = GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16, vocab_size=64)
BLOCK = by_class_name("Block")


def batches(step: int, *, batch: int = 4, config: GPTConfig = SMALL) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def wrap_fn(kind: str):
    if kind == "torch-reentrant":  # PyTorch's own wrapper, reentrant: the failure the harness must catch
        from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_ac

        wrapper = functools.partial(torch_ac.checkpoint_wrapper, checkpoint_impl=torch_ac.CheckpointImpl.REENTRANT)
        return lambda model: torch_ac.apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))
    if kind == "checkpoint":
        return lambda model: apply_activation_checkpointing(model, check_fn=BLOCK)
    if kind == "reentrant":
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT)
        return lambda model: apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=BLOCK)
    if kind == "offload":
        wrapper = functools.partial(offload_wrapper, cpu_copy=True, min_bytes=0)
        return lambda model: apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=BLOCK)
    raise ValueError(kind)


class SharedWeightGPT(GPT):
    """A GPT whose extra, unwrapped projection reuses a weight that lives inside checkpointed block 0."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.extra = torch.nn.Linear(config.d_model, config.d_model, bias=False)
        self.extra.weight = self.layers[0].attn.proj.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x + self.extra(x)))


def _frozen_embedding(config: GPTConfig) -> GPT:
    model = GPT(config)
    model.tok_emb.weight.requires_grad_(False)
    model.pos_emb.weight.requires_grad_(False)
    return model


MODELS = {"gpt": GPT, "shared": SharedWeightGPT, "frozen-embedding": _frozen_embedding}


def parity_cell(recipe: dict[str, Any], wrap: str = "checkpoint", config: dict[str, Any] | None = None,
                model: dict[str, Any] | None = None, model_fn: str = "gpt") -> tuple[bool, str]:
    gpt = GPTConfig(**{**SMALL.__dict__, **(model or {})})
    report = check_parity(
        lambda: MODELS[model_fn](gpt),
        functools.partial(batches, config=gpt),
        wrap=wrap_fn(wrap),
        is_block=BLOCK,
        shard=ShardRecipe(**recipe),
        config=ParityConfig(**(config or {})),
    )
    return report.ok, str(report)


def failing_parity_cell(recipe: dict[str, Any], wrap: str) -> str:
    """A parity cell expected to raise: the error's message and notes (every rank raises alike)."""
    try:
        parity_cell(recipe, wrap)
    except RuntimeError as error:
        return "\n".join([str(error), *getattr(error, "__notes__", [])])
    return "no error"


def _fsdp2_model(base: GPT, wrap: str | None) -> GPT:
    import copy

    from torch.distributed.fsdp import fully_shard

    from ckpt_wrapper import every_nth

    model = copy.deepcopy(base)
    if wrap == "all":
        apply_activation_checkpointing(model, check_fn=BLOCK)
    elif wrap == "every2":
        apply_activation_checkpointing(model, check_fn=every_nth(2, BLOCK, offset=1))
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _init_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # DCP loads into the structure it is given, so the optimizer's state must exist first: a step with
    # zero gradients creates it and (no weight decay, Adam's update 0/(0+eps)) leaves parameters as they are.
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    if optimizer is not None:
        for name, state in get_optimizer_state_dict(model, optimizer)["state"].items():
            flat.update({f"optim.{name}.{k}": v for k, v in state.items()})
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in flat.items() if isinstance(v, torch.Tensor)}


def dcp_round_trip(path: str) -> list[str]:
    """Save model and optimizer state from a fully wrapped FSDP2 model; load it into one wrapped
    differently, one never wrapped, and a plain unsharded model never wrapped. Returns problems found."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    torch.manual_seed(0)
    base = GPT(SMALL)
    expected_keys = set(base.state_dict())
    source = _fsdp2_model(base, "all")
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-2, weight_decay=0.0)
    tokens, targets = batches(0)
    source.loss(tokens, targets).backward()
    optimizer.step()
    optimizer.zero_grad()
    problems = []
    model_sd, optim_sd = get_model_state_dict(source), get_optimizer_state_dict(source, optimizer)
    if set(model_sd) != expected_keys:
        problems.append(f"model keys differ from the unwrapped model's: {sorted(set(model_sd) ^ expected_keys)}")
    if set(optim_sd["state"]) != {n for n, p in base.named_parameters()}:
        problems.append(f"optimizer keys are not the parameter names: {sorted(optim_sd['state'])[:4]}")
    if any("_checkpoint_wrapped_module" in k for k in [*model_sd, *optim_sd["state"]]):
        problems.append("a key carries a wrapper name")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    want = _full_state(source, optimizer)

    for target in ("every2", None, "plain"):
        torch.manual_seed(1)  # different initial weights, so only a real load can make them equal
        fresh = GPT(SMALL)
        model = fresh if target == "plain" else _fsdp2_model(fresh, target)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        _init_optimizer_state(model, opt)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        got = _full_state(model, opt)
        if set(got) != set(want):
            problems.append(f"{target}: state keys differ: {sorted(set(got) ^ set(want))[:6]}")
        for key in sorted(set(got) & set(want)):
            if not torch.equal(got[key], want[key]):
                problems.append(f"{target}: {key} differs after load")
    return problems
