"""Train a GPT-style model (or an HF Llama) with activation checkpointing, sharded, resumable.

    python scripts/launch/train.py --steps 20                                # one process
    torchrun --nproc_per_node 2 scripts/launch/train.py --parallel fsdp2 --ac full
    scripts/launch/run.sh train --steps 20                                   # torchrun, 2 ranks (NPROC=...)
    accelerate launch --config_file scripts/launch/accelerate_fsdp2.yaml scripts/launch/train.py --parallel accelerate

Stop and resume (losses are bitwise those of an uninterrupted run on CPU, whatever the blocks wrapped):

    scripts/launch/run.sh train --steps 100 --checkpoint-dir ckpt --stop-after 40
    scripts/launch/run.sh train --steps 100 --checkpoint-dir ckpt --ac none     # resumes at step 41

Every rank builds the same seeded model, checkpoints the chosen blocks (``--ac``), shards it
(``--parallel``; the backend follows the device: gloo on CPU, NCCL on GPUs) and trains on its slice of a
global batch that depends only on the seed and the step. ``--checkpoint-dir`` saves the model and
optimizer with ``torch.distributed.checkpoint`` plus, per rank, the RNG state and the data position, so
a resumed run continues exactly. Rank 0 shows a progress line (loss, tokens/s, peak memory) and ends
with a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import math
import os
import pathlib
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ckpt_wrapper
from ckpt_wrapper import OffloadOptions, apply_activation_checkpointing, by_class_name, checkpoint_wrapper, every_nth
from ckpt_wrapper import offload_wrapper
from ckpt_wrapper.distributed import default_device, init_distributed
from ckpt_wrapper.testing.recipes import ShardRecipe, shard_model
from ckpt_wrapper.testing.models import GPT, GPTConfig

AC_MODES = ("none", "full", "selective", "offload", "full+offload", "plan")
PARALLEL = ("fsdp2", "fsdp", "ddp", "none", "accelerate")
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
_MiB = 2**20


class UsageError(ValueError):
    """The flags describe a run that cannot work (or a feature this version lacks)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``train.py``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model and data")
    model.add_argument("--model", choices=("gpt", "llama"), default="gpt",
                       help="gpt: ckpt_wrapper.testing.models.GPT; llama: HF LlamaForCausalLM built from a config "
                            "(needs transformers; nothing is downloaded) (default: gpt)")
    model.add_argument("--n-layer", type=int, default=4, help="transformer blocks (default: 4)")
    model.add_argument("--d-model", type=int, default=128, help="hidden width (default: 128)")
    model.add_argument("--n-head", type=int, default=4, help="attention heads (default: 4)")
    model.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    model.add_argument("--vocab-size", type=int, default=512,
                       help="vocabulary size; at least 256 with --data (byte tokens) (default: 512)")
    model.add_argument("--dropout", type=float, default=0.0,
                       help="dropout probability (attention dropout for llama) (default: 0.0)")
    model.add_argument("--data", type=pathlib.Path, default=None,
                       help="a local text file, read as bytes (one token per byte); default: synthetic sequences")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=20, help="optimizer steps of the whole run (default: 20)")
    train.add_argument("--batch", type=int, default=4,
                       help="sequences per rank per step; the global batch is batch x world size (default: 4)")
    train.add_argument("--lr", type=float, default=3e-3,
                       help="peak AdamW learning rate (warm-up, then cosine decay over --steps) (default: 3e-3)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and dropout (default: 0)")
    train.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA exists, else cpu)")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile each block in place (after checkpointing, before sharding)")
    train.add_argument("--compile-backend", default="inductor", help="backend for --compile (default: inductor)")
    par = p.add_argument_group("parallelism")
    par.add_argument("--parallel", choices=PARALLEL, default="fsdp2",
                     help="fsdp2 (fully_shard), fsdp (FSDP1), ddp, none (one rank), or accelerate (whatever "
                          "`accelerate launch --config_file ...` configured) (default: fsdp2)")
    par.add_argument("--sharding-strategy", choices=STRATEGIES, default="FULL_SHARD",
                     help="FSDP1 sharding strategy; for fsdp2 FULL_SHARD reshards after forward and "
                          "SHARD_GRAD_OP keeps parameters gathered (default: FULL_SHARD)")
    par.add_argument("--use-orig-params", action="store_true", help="FSDP1 use_orig_params (needed with --compile)")
    par.add_argument("--mixed-precision", choices=("no", "bf16"), default=None,
                     help="bf16 compute with fp32 parameters and gradient reduction: FSDP's mixed precision, or "
                          "autocast under ddp and none (default: no; under --parallel accelerate, its config)")
    ac = p.add_argument_group("activation checkpointing")
    ac.add_argument("--ac", choices=AC_MODES, default="full",
                    help="none; full (checkpoint_wrapper); selective (op-level, --selective-preset); offload "
                         "(offload_wrapper); full+offload (checkpoint, block inputs to host); plan (per-block "
                         "choice within --memory-budget) (default: full)")
    ac.add_argument("--blocks", default=None,
                    help="class name(s) of the blocks, comma-separated (default: Block for gpt, "
                         "LlamaDecoderLayer for llama); also the FSDP units")
    ac.add_argument("--every", type=int, default=1,
                    help="wrap every N-th block only (default: 1, all); --every 2 wraps blocks 0, 2, ...")
    ac.add_argument("--ac-order", choices=("before", "after"), default="before",
                    help="checkpoint before sharding (FSDP(wrap(block))) or after (wrap(FSDP(block)), "
                         "FSDP1 and DDP) (default: before)")
    ac.add_argument("--selective-preset", default="matmuls",
                    help="preset of --ac selective (ckpt_wrapper.selective.PRESETS) (default: matmuls)")
    ac.add_argument("--memory-budget", type=float, default=0.5,
                    help="--ac plan: activation memory budget, a fraction of the unwrapped model's (0, 1] "
                         "or bytes (> 1) (default: 0.5)")
    ac.add_argument("--offload-cpu-copy", action="store_true",
                    help="offload modes on CPU: copy into separate host buffers anyway (frees nothing; "
                         "exercises the offload path without a GPU)")
    ck = p.add_argument_group("checkpoints and output")
    ck.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                    help="save DCP checkpoints here and resume from the latest one found (default: none)")
    ck.add_argument("--save-every", type=int, default=0,
                    help="also save every N steps (default: 0, only at the end or at --stop-after)")
    ck.add_argument("--stop-after", type=int, default=None,
                    help="stop after this step, saving a checkpoint (as if interrupted); resume with the same "
                         "command without it")
    ck.add_argument("--no-resume", action="store_true", help="start from step 1 even if --checkpoint-dir holds one")
    ck.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto",
                    help="rank 0's display: bar (tqdm if installed, else one updating line), lines (one line "
                         "per --log-every steps), auto (bar on a terminal, else lines) (default: auto)")
    ck.add_argument("--log-every", type=int, default=1, help="steps between progress lines (default: 1)")
    ck.add_argument("--metrics-out", type=pathlib.Path, default=None,
                    help="rank 0 writes losses and the summary to this JSON file")
    return p


def check_args(args: argparse.Namespace, world: int) -> None:
    """Reject flag combinations that cannot work, saying what to change."""
    for name in ("steps", "batch", "every", "log_every", "n_layer", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        raise ValueError(f"--stop-after must be within 1..--steps ({args.steps}), got {args.stop_after}")
    if args.stop_after is not None and args.checkpoint_dir is None:
        raise ValueError("--stop-after saves a checkpoint to resume from: pass --checkpoint-dir too")
    if args.data is not None and args.vocab_size < 256:
        raise ValueError(f"--data reads bytes (256 token values): --vocab-size must be >= 256, got {args.vocab_size}")
    if args.parallel == "none" and world > 1:
        raise ValueError(f"--parallel none trains one unsynchronised copy per rank; run one process, not {world}")
    if args.parallel == "fsdp2" and args.sharding_strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
        raise ValueError(f"--parallel fsdp2 takes FULL_SHARD or SHARD_GRAD_OP here; {args.sharding_strategy} "
                         "is an FSDP1 strategy (--parallel fsdp)")
    if args.ac_order == "after" and (args.ac in ("plan",) or args.compile or args.parallel == "fsdp2"):
        raise ValueError("--ac-order after works with --parallel fsdp, ddp or none, without --compile or --ac plan "
                         "(fully_shard and compile want checkpointing applied first)")
    if args.parallel == "accelerate" and args.ac in ("selective", "plan"):
        raise ValueError(f"--ac {args.ac} is not wired to --parallel accelerate; use fsdp2, fsdp, ddp or none")
    if args.parallel != "accelerate" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ValueError("launched by `accelerate launch` with an FSDP config: pass --parallel accelerate")


# --- model and data ---------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[nn.Module, list[str]]:
    """The seeded model (on CPU) and the class names of its blocks."""
    torch.manual_seed(args.seed)
    if args.model == "gpt":
        config = GPTConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, seq_len=args.seq_len,
                           vocab_size=args.vocab_size, dropout=args.dropout)
        return GPT(config), _block_names(args, "Block")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise ValueError(f"--model llama needs HF transformers ({error}); pip install transformers") from None
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
        max_position_embeddings=args.seq_len, attention_dropout=args.dropout, use_cache=False,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config), _block_names(args, "LlamaDecoderLayer")


def _block_names(args: argparse.Namespace, default: str) -> list[str]:
    return [name.strip() for name in (args.blocks or default).split(",") if name.strip()]


def compute_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean next-token cross-entropy (logits upcast to fp32)."""
    logits = model(tokens) if kind == "gpt" else model(input_ids=tokens, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class Batches:
    """The global batch of each step, a function of (seed, step) only: the data position is the step."""

    def __init__(self, args: argparse.Namespace, global_batch: int) -> None:
        self.seed, self.rows, self.seq, self.vocab = args.seed, global_batch, args.seq_len, args.vocab_size
        self.text: torch.Tensor | None = None
        self.source = "synthetic sequences"
        if args.data is not None:
            raw = args.data.read_bytes()
            if len(raw) <= self.seq + 1:
                raise ValueError(f"--data {args.data} holds {len(raw)} bytes; it needs more than --seq-len + 1")
            self.text = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
            self.source = f"{args.data} ({len(raw)} bytes)"

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.text is not None:
            starts = torch.randint(0, len(self.text) - self.seq - 1, (self.rows,), generator=generator)
            rows = torch.stack([self.text[s: s + self.seq + 1] for s in starts.tolist()])
        else:  # arithmetic sequences modulo the vocabulary: learnable, so the loss visibly falls
            start = torch.randint(0, self.vocab, (self.rows, 1), generator=generator)
            stride = torch.randint(1, 8, (self.rows, 1), generator=generator)
            rows = (start + stride * torch.arange(self.seq + 1)) % self.vocab
        return rows[:, :-1], rows[:, 1:]


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10%: a function of the step alone."""
    warmup = max(1, args.steps // 10)
    if step <= warmup:
        return args.lr * step / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


# --- checkpointing modes ----------------------------------------------------------------------------------


def _not_available(what: str) -> ValueError:
    return ValueError(f"--ac {what} is not available in this version of ckpt_wrapper "
                      f"({ckpt_wrapper.__version__}); use --ac full, offload or full+offload")


def _selective(model: nn.Module, selector: Any, preset: str) -> list[str]:
    try:
        apply = importlib.import_module("ckpt_wrapper.selective").apply_selective_checkpointing
    except (ImportError, AttributeError):
        raise _not_available("selective") from None
    # The preset's keyword is `preset` in the planned API; accept the module's current spelling too.
    keyword = "preset" if "preset" in inspect.signature(apply).parameters else "policy"
    return apply(model, check_fn=selector, **{keyword: preset})


def _plan(model: nn.Module, selector: Any, example: torch.Tensor, budget: float, rank: int) -> list[str]:
    planner = getattr(ckpt_wrapper, "plan", None)
    planner = getattr(planner, "plan", planner) if inspect.ismodule(planner) else planner
    if not callable(planner):
        raise _not_available("plan")
    budget_arg: float | int = int(budget) if budget > 1 else budget
    kwargs = {"check_fn": selector} if "check_fn" in inspect.signature(planner).parameters else {}
    chosen = planner(model, example, memory_budget=budget_arg, **kwargs)
    if rank == 0:
        print(chosen, flush=True)
    return list(chosen.apply(model))


def make_checkpointing(args: argparse.Namespace, names: list[str], example: Callable[[], torch.Tensor],
                       rank: int) -> Callable[[nn.Module], list[str]]:
    """A function that applies ``--ac`` to a model in place and returns the blocks it wrapped."""
    selector = by_class_name(*names)
    if args.every > 1:
        selector = every_nth(args.every, selector)
    offload = OffloadOptions(cpu_copy=args.offload_cpu_copy)

    def apply(model: nn.Module) -> list[str]:
        if args.ac == "none":
            return []
        if args.ac == "selective":
            return _selective(model, selector, args.selective_preset)
        if args.ac == "plan":
            return _plan(model, selector, example(), args.memory_budget, rank)
        wrapper = {
            "full": checkpoint_wrapper,
            "offload": functools.partial(offload_wrapper, cpu_copy=args.offload_cpu_copy),
            "full+offload": functools.partial(checkpoint_wrapper, offload=offload),
        }[args.ac]
        return apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=selector)

    return apply


def _compile_blocks(model: nn.Module, names: list[str], backend: str) -> None:
    # In place (nn.Module.compile): names and state-dict keys gain no `_orig_mod.` prefix.
    for _, block in by_class_name(*names).select(model):
        block.compile(backend=backend)


# --- checkpoints (DCP) ------------------------------------------------------------------------------------


class Checkpoints:
    """DCP checkpoints in ``root/step-NNNNNNNN``: model and optimizer, plus one small file per rank.

    The per-rank file holds what DCP's replicated-state de-duplication would lose: each rank's RNG state
    (dropout streams differ per rank) and the data position (the step).
    """

    def __init__(self, root: pathlib.Path, rank: int, world: int) -> None:
        self.root, self.rank, self.world = root, rank, world

    def latest(self) -> tuple[int, pathlib.Path] | None:
        """The newest complete checkpoint (DCP writes ``.metadata`` last), or None."""
        found = sorted(p for p in self.root.glob("step-*") if (p / ".metadata").exists())
        return (int(found[-1].name.removeprefix("step-")), found[-1]) if found else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> pathlib.Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        path = self.root / f"step-{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(device) | {"step": step, "next_data_step": step + 1, "world_size": self.world},
                   path / f"train_state.rank{self.rank}.pt")
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=path)
        return path

    def load(self, path: pathlib.Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        mine = path / f"train_state.rank{self.rank}.pt"
        extra = torch.load(mine, weights_only=True) if mine.exists() else {"world_size": "fewer"}
        if extra["world_size"] != self.world:
            raise ValueError(f"{path} was saved by {extra['world_size']} ranks, this run has {self.world}: each "
                             "rank's data slice and RNG stream would differ. Resume with the world size that "
                             "saved it, or pass --no-resume")
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        _set_rng_state(extra, device)
        return int(extra["next_data_step"])


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


# --- progress and summary ---------------------------------------------------------------------------------


class Progress:
    """Rank 0's display: tqdm or one ``\\r``-updated line on a terminal, else a line per ``every`` steps."""

    def __init__(self, mode: str, first: int, last: int, every: int, enabled: bool) -> None:
        self.first, self.last, self.every, self.bar = first, last, every, None
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        if self.mode == "bar":
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=last - first + 1, initial=0, desc="train", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, peak: int) -> None:
        text = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  peak {peak / _MiB:,.0f} MiB"
        if self.mode == "bar" and self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.mode == "bar":
            print(f"\rstep {step}/{self.last}  {text}", end="", file=sys.stderr, flush=True)
        elif self.mode == "lines" and (step % self.every == 0 or step == self.last):
            print(f"step {step}/{self.last}  {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "bar":
            print(file=sys.stderr)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA allocator peak on GPUs, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def print_summary(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print("summary", flush=True)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}", flush=True)


# --- the run ----------------------------------------------------------------------------------------------


def _reduce(value: torch.Tensor, op: Any) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return value


def _setup(args: argparse.Namespace, model: nn.Module, names: list[str], batches: Batches, device: torch.device,
           rank: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer, list[str], str, Any]:
    """Checkpoint, compile and shard ``model``; return (model, optimizer, wrapped, description, accelerator)."""
    rows = slice(rank * args.batch, (rank + 1) * args.batch)
    ac = make_checkpointing(args, names, lambda: batches(1)[0][rows].to(device), rank)
    if args.parallel == "accelerate":
        return _setup_accelerate(args, model, names, ac)
    wrapped: list[str] = []

    def checkpoint_then_compile(target: nn.Module) -> None:
        wrapped.extend(ac(target))
        if args.compile:
            _compile_blocks(target, names, args.compile_backend)

    mixed = "bf16" if args.mixed_precision == "bf16" and args.parallel in ("fsdp", "fsdp2") else None
    recipe = ShardRecipe(
        kind={"fsdp": "fsdp1"}.get(args.parallel, args.parallel), wrap_order=args.ac_order,
        sharding_strategy=args.sharding_strategy, use_orig_params=args.use_orig_params,
        reshard_after_forward=args.sharding_strategy == "FULL_SHARD", param_dtype=mixed,
        reduce_dtype="fp32" if mixed else None,
    )
    model = shard_model(model, recipe, is_block=by_class_name(*names), apply_checkpointing=checkpoint_then_compile,
                        device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return model, optimizer, wrapped, recipe.describe(), None


def _setup_accelerate(args: argparse.Namespace, model: nn.Module, names: list[str],
                      ac: Callable[[nn.Module], list[str]]) -> tuple[nn.Module, Any, list[str], str, Any]:
    from accelerate import Accelerator

    from ckpt_wrapper.integrations.accelerate import apply_checkpointing

    options = {} if args.mixed_precision is None else {"mixed_precision": args.mixed_precision}
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **options)
    # Declared as HF models do: accelerate's FSDP plugin makes these FSDP units unless its config names others.
    model._no_split_modules = list(names)
    wrapped: list[str] = []
    if args.ac != "none":
        wrapper = {
            "full": checkpoint_wrapper,
            "offload": functools.partial(offload_wrapper, cpu_copy=args.offload_cpu_copy),
            "full+offload": functools.partial(checkpoint_wrapper, offload=OffloadOptions(cpu_copy=args.offload_cpu_copy)),
        }[args.ac]
        selector = by_class_name(*names) if args.every == 1 else every_nth(args.every, by_class_name(*names))
        wrapped = apply_checkpointing(accelerator, model, check_fn=selector, checkpoint_wrapper_fn=wrapper)
    if getattr(accelerator, "is_fsdp2", False):  # FSDP2 prepares model and optimizer together
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # FSDP1 flattens parameters: the optimizer must be built on the prepared model
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=args.lr))
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    note = " (accelerate runs its FSDP plugin on accelerators only)" if kind == "MULTI_CPU" and os.environ.get(
        "ACCELERATE_USE_FSDP", "").lower() == "true" else ""
    return model, optimizer, wrapped, f"accelerate {kind}{note}", accelerator


def run(args: argparse.Namespace) -> int:
    """Train as the flags say; return the exit status."""
    device = default_device(args.device)
    owns_group = False
    if args.parallel != "accelerate":
        owns_group = init_distributed(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        status = _train(args, device, rank, world)
    except BaseException:
        # No barrier: a rank stuck in a collective would never reach it; torchrun stops the rest.
        if owns_group:
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        # Every rank leaves together: a gloo peer that tears down its connections while another rank still
        # uses the group can abort that rank ("terminate called without an active exception").
        dist.barrier()
        if owns_group or args.parallel == "accelerate":
            dist.destroy_process_group()
    return status


def _train(args: argparse.Namespace, device: torch.device, rank: int, world: int) -> int:
    log: Callable[[str], None] = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)
    try:  # everything up to the first step: a ValueError here means the flags cannot work
        check_args(args, world)
        model, names = build_model(args)
        n_params = sum(p.numel() for p in model.parameters())
        batches = Batches(args, args.batch * world)
        model, optimizer, wrapped, described, accelerator = _setup(args, model, names, batches, device, rank, world)
        device = accelerator.device if accelerator is not None else device
        torch.manual_seed(args.seed + 1 + rank)  # each rank's dropout stream; restored from a checkpoint on resume
        checkpoints = Checkpoints(args.checkpoint_dir, rank, world) if args.checkpoint_dir else None
        first, resumed_from = 1, None
        latest = checkpoints.latest() if checkpoints is not None and not args.no_resume else None
        if latest is not None:
            first = checkpoints.load(latest[1], model, optimizer, device)
            resumed_from = latest[0]
    except ValueError as error:
        raise UsageError(str(error)) from error
    last = args.stop_after or args.steps
    log(f"train: {args.model} {args.n_layer} layers, width {args.d_model}; {described}; --ac {args.ac}: "
        f"{len(wrapped)} block(s) wrapped; {world} rank(s) on {device}; data: {batches.source}; "
        + (f"resuming at step {first} from {latest[1]}" if latest else "from step 1"))
    if first > last:
        log(f"nothing to do: the checkpoint is at step {first - 1}, the run ends at step {last}")

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if args.mixed_precision == "bf16" and args.parallel in ("ddp", "none") else contextlib.nullcontext())
    rows = slice(rank * args.batch, (rank + 1) * args.batch)
    tokens_per_step = args.batch * world * args.seq_len
    progress = Progress(args.progress, first, last, args.log_every, enabled=rank == 0)
    losses: dict[int, float] = {}
    times: list[float] = []
    saved: pathlib.Path | None = None
    model.train()
    for step in range(first, last + 1):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        tokens, targets = (t[rows].to(device) for t in batches(step))
        with autocast:
            loss = compute_loss(model, tokens, targets, args.model)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = _reduce(loss.detach().float().clone(), dist.ReduceOp.SUM) / world  # gloo has no AVG
        losses[step] = mean.item()  # .item() waits for the step: the timing below is honest on GPUs too
        times.append(time.perf_counter() - started)
        progress.update(step, losses[step], tokens_per_step / times[-1], peak_memory(device))
        if checkpoints is not None and (step == last or (args.save_every and step % args.save_every == 0)):
            saved = checkpoints.save(step, model, optimizer, device)
    progress.close()

    peak = int(_reduce(torch.tensor([peak_memory(device)], dtype=torch.float64, device=device), dist.ReduceOp.MAX).item())
    later = sorted(times[1:] or times)
    median = later[len(later) // 2] if later else float("nan")
    summary = [
        ("model", f"{args.model}, {args.n_layer} layers, width {args.d_model}, {n_params / 1e6:.2f} M parameters"),
        ("parallelism", f"{described}; {world} rank(s), "
                        f"{dist.get_backend() if dist.is_initialized() else 'no process group'} on {device}"),
        ("checkpointing", f"{args.ac}: {len(wrapped)} block(s) wrapped ({', '.join(names)}"
                          f"{f', every {args.every}' if args.every > 1 else ''})"),
        ("mixed precision / compile", f"{args.mixed_precision or 'no'} / "
                                      f"{args.compile_backend if args.compile else 'no'}"),
        ("steps", f"{first}-{last} of {args.steps}" + (f" (resumed from step {resumed_from})" if resumed_from else "")),
        ("loss first / last", f"{losses[first]:.4f} / {losses[last]:.4f}" if losses else "-"),
        ("step time (median after the first)", f"{median:.3f} s"),
        ("tokens/s (global)", f"{tokens_per_step / median:,.0f}" if losses else "-"),
        ("peak memory (max over ranks)", f"{peak / _MiB:,.1f} MiB {'allocated' if device.type == 'cuda' else 'resident'}"),
        ("checkpoint", str(saved) if saved else "-"),
    ]
    if rank == 0:
        print_summary(summary)
        if args.metrics_out is not None:
            args.metrics_out.write_text(json.dumps({
                "losses": {str(step): value for step, value in losses.items()}, "first_step": first,
                "last_step": last, "resumed_from": resumed_from, "wrapped": wrapped, "world_size": world,
                "parallel": described, "tokens_per_s": tokens_per_step / median if losses else None,
                "peak_memory_bytes": peak, "checkpoint": str(saved) if saved else None,
            }, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and train; a setup the flags cannot describe exits with status 2 and says why."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
