"""Train a model with activation checkpointing and FSDP2: the example to copy.

    python scripts/launch/train.py --steps 20                                 # one process
    torchrun --nproc_per_node 2 scripts/launch/train.py --steps 20            # 2 ranks (gloo on CPU, NCCL on GPUs)
    scripts/launch/run.sh train --steps 20                                    # the same through the launcher
    torchrun --nproc_per_node 2 scripts/launch/train.py --checkpoint-dir ckpt  # run it again: it resumes
    torchrun --nproc_per_node 2 scripts/launch/train.py --model llama          # HF Llama built from a config

The lines that matter are in ``main()``: build the model, choose its blocks, checkpoint them, shard each
block and then the root with ``fully_shard``, train. Checkpointing comes before sharding (as torchtitan
does): FSDP2 gathers a block's parameters again for its recompute in backward.

Every other mode (FSDP1, DDP, accelerate, offload, selective, plans, compile, bitwise resume with
dropout) is in ``train_driver.py`` beside this file, which takes the same flags.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from ckpt_wrapper import apply_activation_checkpointing, by_class_name
from ckpt_wrapper.distributed import default_device, init_distributed, shutdown_distributed
from ckpt_wrapper.table import format_table
from ckpt_wrapper.testing.data import counting_batch, lm_loss
from ckpt_wrapper.testing.models import GPT, GPTConfig
from ckpt_wrapper.tools import flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: the names every ckpt_wrapper command uses (``ckpt_wrapper.tools.flags``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("gpt", "llama"), default="gpt",
                        help="gpt: the toy GPT; llama: HF LlamaForCausalLM from a config (needs transformers; "
                             "nothing is downloaded) (default: gpt)")
    flags.add_model_flags(parser, n_layer=4, d_model=128, n_head=4, seq_len=64, vocab_size=512)
    flags.add_training_flags(parser, steps=20, batch=4, lr=3e-3, seed=0)
    flags.add_device_flag(parser)
    flags.add_blocks_flag(parser, default=None, what="Block for gpt, LlamaDecoderLayer for llama")
    parser.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                        help="save a DCP checkpoint here at the end (DIR/step-N), and resume from the newest one found; "
                             "a checkpoint of another model is refused")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The model, seeded (the same weights on every rank), and the class name of its blocks."""
    torch.manual_seed(args.seed)
    if args.model == "gpt":
        config = GPTConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                           seq_len=args.seq_len, vocab_size=args.vocab_size)
        return GPT(config), "Block"
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                         num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                         max_position_embeddings=args.seq_len, use_cache=False)
    return LlamaForCausalLM(config), "LlamaDecoderLayer"


def forward(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits: the GPT returns them, an HF model returns an output holding them."""
    out = model(tokens)
    return getattr(out, "logits", out)


def model_config(args: argparse.Namespace) -> dict:
    """What shapes the model's state: a checkpoint resumes only into the same values."""
    return {key: getattr(args, key) for key in ("model", "n_layer", "d_model", "n_head", "seq_len", "vocab_size")}


def newest_step(directory: pathlib.Path | None, config: dict) -> pathlib.Path | None:
    """The newest complete checkpoint in ``directory`` (None if there is none), read before any training.

    Raises:
        ValueError: it was saved by another model (saying what differs).
    """
    found = sorted(directory.glob("step-*/config.json")) if directory is not None else []  # complete steps only
    if not found:
        return None
    saved = json.loads(found[-1].read_text())
    if saved != config:
        differ = ", ".join(f"--{key.replace('_', '-')} {saved.get(key)} there, {config[key]} here"
                           for key in config if saved.get(key) != config[key])
        raise ValueError(f"{found[-1].parent} holds another model ({differ}): pass the same flags, "
                         "or another --checkpoint-dir to start fresh")
    return found[-1].parent


def resume(step_dir: pathlib.Path | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the checkpoint in ``step_dir``, if any; return the step it was saved at (0 if none)."""
    if step_dir is None:
        return 0
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": 0}
    dcp.load(state, checkpoint_id=step_dir)  # every rank reads its own shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["step"]


def save(directory: pathlib.Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> None:
    """Save model and optimizer, sharded, under their plain names (they load however the blocks are wrapped).

    Written into a hidden folder and renamed into place once every rank is done, with ``config.json`` last:
    a save cut short is never taken for the newest step.
    """
    final, partial = directory / f"step-{step:06d}", directory / f".partial-step-{step:06d}"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "step": step}, checkpoint_id=partial)
    dist.barrier()  # every rank's shards are written
    if dist.get_rank() == 0:
        (partial / "config.json").write_text(json.dumps(config))
        partial.rename(final)
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    """Train as the flags say; rank 0 prints progress and a summary."""
    args = parse_args(argv)
    try:  # before any process group: a mistake is one line and exit status 2
        checkpoint = newest_step(args.checkpoint_dir, model_config(args))
    except ValueError as refused:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same: rank 0 says it
            print(f"train.py: {refused}", file=sys.stderr, flush=True)
        return 2
    device = default_device(args.device)  # cuda:LOCAL_RANK on GPUs, else the CPU
    init_distributed(device)              # torchrun's process group, or a one-rank group for one process
    rank, world = dist.get_rank(), dist.get_world_size()

    model, block_class = build_model(args)
    # 1. Checkpoint the blocks: their activations are recomputed in backward instead of being kept.
    blocks = args.blocks or block_class
    wrapped = apply_activation_checkpointing(model, check_fn=by_class_name(blocks))
    # 2. Shard each checkpointed block, then the root (FSDP2). The blocks stay checkpointed.
    model.to(device)
    for name in wrapped:
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    # 3. Train as usual.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    first = resume(checkpoint, model, optimizer) + 1

    losses, times = [], []
    mine = slice(rank * args.batch, (rank + 1) * args.batch)  # this rank's rows of the global batch
    for step in range(first, args.steps + 1):
        started = time.perf_counter()
        tokens, targets = counting_batch(step=step, rows=args.batch * world, seq_len=args.seq_len,
                                         vocab_size=args.vocab_size, seed=args.seed, device=device)
        loss = lm_loss(forward(model, tokens[mine]), targets[mine])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the sum over ranks (gloo has no average)
        losses.append(total.item() / world)
        times.append(time.perf_counter() - started)
        if rank == 0:
            print(f"step {step}/{args.steps}  loss {losses[-1]:.4f}  ({times[-1]:.2f} s)", flush=True)
    if args.checkpoint_dir is not None and losses:
        save(args.checkpoint_dir, args.steps, model, optimizer, model_config(args))

    if rank == 0:
        rows = [
            ("model", f"{args.model}, {args.n_layer} layers, width {args.d_model}"),
            ("ranks", f"{world} ({dist.get_backend()} on {device})"),
            ("blocks checkpointed, then sharded", f"{len(wrapped)} ({blocks})"),
            ("steps", f"{first}-{args.steps}" if losses else f"none: the checkpoint is at step {first - 1}"),
            ("loss first / last", f"{losses[0]:.4f} / {losses[-1]:.4f}" if losses else "-"),
            ("step time (median)", f"{sorted(times)[len(times) // 2]:.3f} s" if times else "-"),
            ("checkpoint", str(args.checkpoint_dir or "-")),
        ]
        print("summary\n" + format_table(rows, indent="  "), flush=True)
    # 4. Leave: drop what holds the process groups, then barrier, destroy and free them (see
    #    shutdown_distributed: a group left to interpreter shutdown can abort a finished run).
    del model, optimizer
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
