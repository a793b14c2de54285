"""The planner's predicted step peak against the measured one, at several budgets, on one process.

For each budget: ``ckpt_wrapper.plan(model, tokens, memory_budget=B, optimizer=AdamW)``, the plan applied to a
copy, one warm-up training step (forward, sum of the logits, backward, AdamW step, ``zero_grad``), then the
peak of the next step measured independently of the planner: PyTorch's ``MemTracker`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA (``ckpt_wrapper.measure.measured_step_peak``). Memory only: no
timing, so a busy machine does not change the figures. Planning is deterministic (the default cost).

With ``--time``, step time too: the cost model is calibrated on this machine and model first
(``Calibration.fit``: the constants of ``Calibration.measure``, the FLOP rate fitted to the unwrapped
model's timed step; stored in each plan), and each plan's predicted seconds of a forward and backward (``plan.predicted_seconds``)
are set beside the median of ``--rounds`` timed forward-and-backward steps of the planned copy. The plans'
steps are timed in turn, round by round, so a drift of the machine's speed reaches every plan alike, and
all before any MemTracker runs. The last column compares the ratios to the first budget's step (predicted
against measured), which a change of the machine's speed between the fit and the timed steps does not
move. Time needs a quiet machine.

With ``--sharding fsdp2`` (or ``ddp``), under ``torchrun`` on gloo: every rank calibrates at once (the ranks
share the machine as they will in training); with ``--time`` that is ``Calibration.fit(sharding=...)``, which
also measures the group's collectives and scales them to the unwrapped model's sharded step, else
``measure_communication`` alone. Then each plan is made for the sharding, the planned copy sharded
(``fully_shard`` on every block and the root, or DDP) and its step measured; rank 0 prints. The predicted
step time includes the modelled communication (``plan.communication``).

Usage:
    # the CPU reference workload (models.CPU_REFERENCE, batch 4, fp32), one thread:
    python scripts/bench/planner_peak.py --reference
    # a tiny HF Llama (transformers, no download):
    python scripts/bench/planner_peak.py --llama
    # the same, with predicted against measured step time (2 threads, as the CPU reference workload):
    python scripts/bench/planner_peak.py --reference --time --threads 2
    # 2-rank FSDP2 on CPU, one thread per rank:
    torchrun --nproc_per_node 2 scripts/bench/planner_peak.py --reference --time --sharding fsdp2
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.distributed as dist

import ckpt_wrapper
from ckpt_wrapper import by_class_name
from ckpt_wrapper.measure import measured_step_peak
from ckpt_wrapper.planner.communication import shard_as_planned
from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.planner.profile import call_model, scalar_of, wall_seconds
from ckpt_wrapper.table import format_table
from ckpt_wrapper.testing.models import CPU_REFERENCE, GPT, GPTConfig


def main() -> None:
    """Plan at each budget, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="models.CPU_REFERENCE instead of a small GPT")
    parser.add_argument("--llama", action="store_true", help="a tiny HF LlamaForCausalLM instead of the GPT")
    parser.add_argument("--budgets", default="1.0,0.5,0.3,0.1", help="activation budgets (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--time", action="store_true", help="also predicted against measured step time (calibrated here)")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per plan with --time (default: %(default)s)")
    parser.add_argument("--sharding", choices=["none", "ddp", "fsdp2"], default="none",
                        help="shard the planned copy over the torchrun group (gloo) (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sharded = args.sharding != "none"
    if sharded:
        dist.init_process_group("gloo")
    try:
        _run(args, sharded)
    finally:
        if sharded:
            dist.barrier()
            dist.destroy_process_group()


class _Run:
    """One budget's plan, its applied (and sharded) copy with an AdamW, and its timed steps."""

    def __init__(self, budget: float, plan: ckpt_wrapper.Plan, model: torch.nn.Module, batch: object) -> None:
        self.budget, self.plan, self.model, self.batch = budget, plan, model, batch
        self.optimizer = torch.optim.AdamW(model.parameters())
        self.seconds: list[float] = []

    def backward(self) -> None:
        """The step the plan models: floating outputs summed, the output held to the end."""
        out = call_model(self.model, self.batch)
        scalar_of(out).backward()

    def forward_backward(self) -> None:
        self.backward()
        self.model.zero_grad()

    def step(self) -> None:
        self.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def _run(args: argparse.Namespace, sharded: bool) -> None:
    rank = dist.get_rank() if sharded else 0
    if args.llama:
        import transformers

        config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=4, vocab_size=2000)
        model = transformers.LlamaForCausalLM(config)
        batch: object = {"input_ids": torch.randint(0, 2000, (4, 128), generator=torch.Generator().manual_seed(rank)),
                         "use_cache": False}
        options = {"check_fn": by_class_name("LlamaDecoderLayer")}
        name = "HF Llama (4 layers, hidden 256, seq 128, batch 4)"
    else:
        config = CPU_REFERENCE if args.reference else GPTConfig(n_layer=8, d_model=256, n_head=4, seq_len=128,
                                                                vocab_size=2000)
        model = GPT(config)
        batch = torch.randint(0, config.vocab_size, (4, config.seq_len), generator=torch.Generator().manual_seed(rank))
        options = {}
        name = f"GPT ({config.n_layer} blocks, width {config.d_model}, seq {config.seq_len}, batch 4)"
    if args.time:
        options["calibration"] = Calibration.fit(model, batch, repeats=args.rounds, sharding=args.sharding,
                                                 check_fn=options.get("check_fn"))
    elif sharded:
        options["calibration"] = Calibration.default("cpu").measure_communication()
    if sharded:
        options["sharding"] = args.sharding
    runs = []
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = ckpt_wrapper.plan(model, batch, memory_budget=budget, optimizer=torch.optim.AdamW, **options)
        applied = copy.deepcopy(model)
        plan.apply(applied)
        if sharded:
            applied = shard_as_planned(applied, [entry.name for entry in plan.entries], args.sharding,
                                       torch.device("cpu"))
        runs.append(_Run(budget, plan, applied, batch))
    if args.time:  # before any MemTracker runs, each plan's steps interleaved with the others' (drift is shared)
        barrier = dist.barrier if sharded else None  # every rank starts each timed step together
        for run in runs:
            run.forward_backward()  # untimed
        for _ in range(args.rounds):
            for run in runs:
                run.seconds += wall_seconds(run.forward_backward, torch.device("cpu"), 1, barrier)
    rows = []
    for run in runs:
        run.step()
        measured = measured_step_peak(run.step, run.model, run.optimizer)
        plan = run.plan
        predicted = plan.peak["peak_bytes"]
        rows.append([f"{run.budget:g}", str(plan.entries[0].strategy), plan.peak["at"], f"{predicted / 2**20:.2f}",
                     f"{measured / 2**20:.2f}", f"{predicted / measured - 1:+.2%}"])
        if args.time:
            seconds = statistics.median(run.seconds)
            rows[-1] += [f"{plan.predicted_seconds * 1e3:.1f}"]
            if sharded:
                rows[-1] += [f"{plan.communication['seconds'] * 1e3:.1f}"]
            rows[-1] += [f"{seconds * 1e3:.1f}", f"{plan.predicted_seconds / seconds - 1:+.1%}"]
            first = runs[0]  # ratios to the first budget's step: a drift between the fit and now cancels
            predicted_ratio = plan.predicted_seconds / first.plan.predicted_seconds
            rows[-1] += [f"{predicted_ratio / (seconds / statistics.median(first.seconds)) - 1:+.1%}"]
    if rank != 0:
        return
    print(f"{name}, fp32, AdamW, torch {torch.__version__}, {args.threads} thread(s)"
          + (f" per rank, {args.sharding} over {dist.get_world_size()} ranks" if sharded else "")
          + (f", {options['calibration'].source}" if "calibration" in options else ""))
    headers = ["budget", "block 0", "peak at", "predicted MiB", "measured MiB", "error"]
    if args.time:
        headers += (["predicted ms"] + (["of which comm"] if sharded else [])
                    + ["measured ms", "time error", f"ratio error (to {runs[0].budget:g})"])
    print(format_table(rows, headers=headers, align="lll" + "r" * (len(headers) - 3)))



if __name__ == "__main__":
    main()
