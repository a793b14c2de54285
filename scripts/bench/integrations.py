"""Each tool's own checkpointing against ckpt_wrapper's, on the same model in one process.

Per tool (``--tool lightning``, ``hf``, ``torchtitan`` or ``all``), configurations with identical weights
run interleaved round by round through the one timing loop (``ckpt_wrapper.tools.benchkit``):

- ``lightning``: a GPT (``--preset``/overrides, as the other benchmarks): ``none``; ``lightning_own``,
  what ``FSDPStrategy(activation_checkpointing_policy={Block})`` applies (Lightning's own
  ``_setup_activation_checkpointing``: PyTorch's ``checkpoint_wrapper``); ``ckpt_wrapper``, what
  ``CheckpointingCallback(check_fn=by_class_name("Block"))`` applies.
- ``hf``: a Llama built from ``LlamaConfig`` with the same shape: ``none``; ``hf_own``,
  ``model.gradient_checkpointing_enable()`` (what ``--gradient_checkpointing`` calls); ``ckpt_wrapper``, what
  ``use_ckpt_wrapper(trainer)`` applies (every ``_no_split_modules`` layer).
- ``torchtitan``: torchtitan's llama3 debugmodel (width 256) with ``--n-layer`` layers and SDPA attention:
  ``none``; ``titan_full`` / ``titan_selective`` (its ``FullAC`` / ``SelectiveAC``); ``ckpt_full`` /
  ``ckpt_selective`` (``ac_config(mode="full")`` / ``ac_config(mode="selective", preset="titan")``).

The trainers' loops are left out: they are the same with either checkpointing, so step time is
forward + loss + backward of the model, as in ``scripts/bench/overhead.py``. Reported per configuration:
median step time, its ratio to the tool's own checkpointing, bytes held after forward
(``held_after_forward``) and on CUDA the peak allocated during a step; ratios are within one run.

Usage:
    python scripts/bench/integrations.py --tool all --rounds 20 --warmup 3          # CUDA when present
    python scripts/bench/integrations.py --tool lightning --device cpu --rounds 30  # CPU
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckpt_wrapper import apply_activation_checkpointing, by_class_name
from ckpt_wrapper.measure import held_after_forward
from ckpt_wrapper.testing import models
from ckpt_wrapper.tools import bench_flags, benchkit

TOOLS = ("lightning", "hf", "torchtitan")
_log = benchkit.make_logger("integrations")


class _Logits(nn.Module):
    """An HF causal LM as ``tokens -> logits``, the call ``benchkit.train_step`` makes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def lightning_models(config: models.GPTConfig) -> dict[str, nn.Module]:
    """The GPT plain, with Lightning FSDPStrategy's checkpointing, and with the callback's."""
    from lightning.fabric.strategies.fsdp import _activation_checkpointing_kwargs, _setup_activation_checkpointing

    from ckpt_wrapper.integrations.lightning import apply_checkpointing

    base = models.GPT(config)
    own = copy.deepcopy(base)
    _setup_activation_checkpointing(own, _activation_checkpointing_kwargs(None, {models.Block}))
    ours = copy.deepcopy(base)
    apply_checkpointing(ours, check_fn=by_class_name("Block"))
    return {"none": base, "lightning_own": own, "ckpt_wrapper": ours}


def hf_models(config: models.GPTConfig) -> dict[str, nn.Module]:
    """A Llama of the GPT's shape, plain, with HF's gradient checkpointing, and with ckpt_wrapper's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=4 * config.d_model,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_head,
        max_position_embeddings=config.seq_len, use_cache=False))
    own = copy.deepcopy(base)
    own.gradient_checkpointing_enable()
    ours = copy.deepcopy(base)
    apply_activation_checkpointing(ours, check_fn=by_class_name(*ours._no_split_modules))
    return {name: _Logits(model) for name, model in (("none", base), ("hf_own", own), ("ckpt_wrapper", ours))}


def torchtitan_models(config: models.GPTConfig) -> dict[str, nn.Module]:
    """torchtitan's llama3 debugmodel cut to ``n_layer`` layers (SDPA), under its AC and ckpt_wrapper's."""
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import llama3_configs

    from ckpt_wrapper.integrations.torchtitan import ac_config

    titan = llama3_configs["debugmodel"](attn_backend="flex")
    titan.layers = titan.layers[: config.n_layer]
    for layer in titan.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    base = titan.build()
    base.init_states(buffer_device=None)
    built = {"none": base}
    for name, ac in (("titan_full", FullAC.Config()), ("titan_selective", SelectiveAC.Config()),
                     ("ckpt_full", ac_config(mode="full")), ("ckpt_selective", ac_config(mode="selective"))):
        built[name] = copy.deepcopy(base)
        ac.build().apply(built[name])
    return built


BUILDERS: dict[str, Callable[[models.GPTConfig], dict[str, nn.Module]]] = {
    "lightning": lightning_models, "hf": hf_models, "torchtitan": torchtitan_models}
OWN = {"lightning": {"ckpt_wrapper": "lightning_own"}, "hf": {"ckpt_wrapper": "hf_own"},
       "torchtitan": {"ckpt_full": "titan_full", "ckpt_selective": "titan_selective"}}
"""Per tool: each ckpt_wrapper configuration and the tool's own it is compared with."""


def bench_tool(tool: str, config: models.GPTConfig, args: Any, run: benchkit.Run) -> dict[str, Any]:
    """Time and measure one tool's configurations; returns the tool's results."""
    torch.manual_seed(args.seed)
    with torch.device(run.device):
        built = {name: model.to(run.dtype) for name, model in BUILDERS[tool](config).items()}
    vocab = 2048 if tool == "torchtitan" else config.vocab_size
    tokens, targets = benchkit.make_batch(dataclasses.replace(config, vocab_size=vocab), args.batch, args.seed, run.device)
    steps = {name: functools.partial(benchkit.train_step, model, tokens, targets) for name, model in built.items()}
    losses = {name: step().item() for name, step in steps.items()}  # identical weights: identical losses
    _log(f"{tool}: first-step losses " + ", ".join(f"{n} {v:.6f}" for n, v in losses.items()))
    if max(losses.values()) - min(losses.values()) > 1e-3 * max(1.0, abs(losses["none"])):
        raise RuntimeError(f"{tool}: configurations disagree on the loss ({losses}); the comparison would be meaningless")
    names = list(built)
    samples = benchkit.run_rounds(names, lambda name: benchkit.timed(steps[name], run.device, args.steps),
                                  warmup=args.warmup, rounds=args.rounds, log=_log)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        peaks = [s.peak_bytes for s in samples[name] if s.peak_bytes is not None]
        results[name] = {"median_s": statistics.median(s.seconds for s in samples[name]),
                         "held_after_forward_bytes": held_after_forward(functools.partial(built[name], tokens), device=run.device),
                         "peak_above_start_bytes": max(peaks) if peaks else None}
    for ours, own in OWN[tool].items():
        for key, value in (("time_ratio_to_own", "median_s"), ("held_ratio_to_own", "held_after_forward_bytes"),
                           ("peak_ratio_to_own", "peak_above_start_bytes")):
            a, b = results[ours][value], results[own][value]
            results[ours][key] = a / b if a is not None and b else None
    return {"first_step_losses": losses, "results": results}


def markdown(report: dict[str, Any]) -> str:
    """The tables: one row per configuration, ratios to the tool's own checkpointing."""
    lines = [benchkit.heading("Each tool's checkpointing against ckpt_wrapper's", report), ""]
    for tool, entry in report["tools"].items():
        lines += [f"#### {tool}", ""]
        rows = []
        for name, r in entry["results"].items():
            ratio = lambda key: "" if r.get(key) is None else f"{r[key]:.3f}"  # noqa: E731
            peak = "" if r["peak_above_start_bytes"] is None else f"{r['peak_above_start_bytes'] / 2**20:.1f}"
            rows.append([name, f"{r['median_s'] * 1e3:.2f}", ratio("time_ratio_to_own"),
                         f"{r['held_after_forward_bytes'] / 2**20:.1f}", ratio("held_ratio_to_own"), peak,
                         ratio("peak_ratio_to_own")])
        lines += benchkit.markdown_table(["config", "step ms", "time / own", "held MiB", "held / own", "peak MiB",
                                          "peak / own"], rows, align="lrrrrrr")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_flags.script_parser("Each tool's own checkpointing against ckpt_wrapper's, interleaved in one process.")
    parser.add_argument("--tool", choices=[*TOOLS, "all"], default="all", help="which tool's checkpointing to compare")
    parser.add_argument("--out", type=Path, default=Path("bench-results/integrations.json"), help="JSON results file")
    args = parser.parse_args(argv)
    bench_flags.check_run_arguments(parser, args)
    run = benchkit.prepare_run(args.device, dtype=args.dtype, threads=args.threads, reexec=not args.no_reexec, log=_log)
    preset, config = benchkit.model_config(args.preset, reference=args.reference, cuda=run.cuda,
                                           overrides={field: getattr(args, field) for field in benchkit.MODEL_FIELDS})
    report: dict[str, Any] = {"benchmark": "integrations", "command": benchkit.command_line(),
                              "environment": benchkit.environment(run.device),
                              "model": {"preset": preset, **dataclasses.asdict(config), "batch": args.batch,
                                        "dtype": str(run.dtype)},
                              "rounds": args.rounds, "warmup": args.warmup, "steps_per_round": args.steps, "tools": {}}
    for tool in TOOLS if args.tool == "all" else (args.tool,):
        report["tools"][tool] = bench_tool(tool, config, args, run)
    print(markdown(report))
    benchkit.write_json(args.out, report)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
