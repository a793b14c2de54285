"""The planner's predicted step peak against the measured one, at several budgets, on one process.

For each budget: ``ckpt_wrapper.plan(model, tokens, memory_budget=B, optimizer=AdamW)``, the plan applied to a
copy, one warm-up training step (forward, sum of the logits, backward, AdamW step, ``zero_grad``), then the
peak of the next step measured independently of the planner: PyTorch's ``MemTracker`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA (``ckpt_wrapper.measure.measured_step_peak``). Memory only: no
timing, so a busy machine does not change the figures. Planning is deterministic (the default cost).

With ``--time``, step time too: the cost model is calibrated on this machine and model first
(``Calibration.fit``: the constants of ``Calibration.measure``, the FLOP rate fitted to the unwrapped
model's timed step; stored in each plan), and each plan's predicted seconds of a forward and backward (``plan.predicted_seconds``)
are set beside the median of ``--rounds`` timed forward-and-backward steps of the planned copy. Time needs a
quiet machine.

Usage:
    # the CPU reference workload (models.CPU_REFERENCE, batch 4, fp32), one thread:
    python scripts/bench/planner_peak.py --reference
    # a tiny HF Llama (transformers, no download):
    python scripts/bench/planner_peak.py --llama
    # the same, with predicted against measured step time (2 threads, as the CPU reference workload):
    python scripts/bench/planner_peak.py --reference --time --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import ckpt_wrapper
from ckpt_wrapper import by_class_name
from ckpt_wrapper.measure import measured_step_peak
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.llama:
        import transformers

        config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=4, vocab_size=2000)
        model = transformers.LlamaForCausalLM(config)
        batch: object = {"input_ids": torch.randint(0, 2000, (4, 128)), "use_cache": False}
        options = {"check_fn": by_class_name("LlamaDecoderLayer")}
        name = "HF Llama (4 layers, hidden 256, seq 128, batch 4)"
    else:
        config = CPU_REFERENCE if args.reference else GPTConfig(n_layer=8, d_model=256, n_head=4, seq_len=128,
                                                                vocab_size=2000)
        model = GPT(config)
        batch = torch.randint(0, config.vocab_size, (4, config.seq_len))
        options = {}
        name = f"GPT ({config.n_layer} blocks, width {config.d_model}, seq {config.seq_len}, batch 4)"
    if args.time:
        options["calibration"] = Calibration.fit(model, batch, repeats=args.rounds)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = ckpt_wrapper.plan(model, batch, memory_budget=budget, optimizer=torch.optim.AdamW, **options)
        applied = copy.deepcopy(model)
        plan.apply(applied)
        optimizer = torch.optim.AdamW(applied.parameters())

        def backward() -> None:  # the step plan models: floating outputs summed, the output held to the end
            out = call_model(applied, batch)
            scalar_of(out).backward()

        def step() -> None:
            backward()
            optimizer.step()
            optimizer.zero_grad()

        def forward_backward() -> None:
            backward()
            applied.zero_grad()

        seconds = None
        if args.time:  # before MemTracker runs; one untimed step first
            forward_backward()
            seconds = statistics.median(wall_seconds(forward_backward, torch.device("cpu"), args.rounds))
        step()
        measured = measured_step_peak(step, applied, optimizer)
        predicted = plan.peak["peak_bytes"]
        rows.append([f"{budget:g}", str(plan.entries[0].strategy), plan.peak["at"], f"{predicted / 2**20:.2f}",
                     f"{measured / 2**20:.2f}", f"{predicted / measured - 1:+.2%}"])
        if seconds is not None:
            rows[-1] += [f"{plan.predicted_seconds * 1e3:.1f}", f"{seconds * 1e3:.1f}",
                         f"{plan.predicted_seconds / seconds - 1:+.1%}"]
    print(f"{name}, fp32, AdamW, torch {torch.__version__}, {args.threads} thread(s)"
          + (f", {options['calibration'].source}" if args.time else ""))
    headers = ["budget", "block 0", "peak at", "predicted MiB", "measured MiB", "error"]
    if args.time:
        headers += ["predicted ms", "measured ms", "time error"]
    print(format_table(rows, headers=headers, align="lll" + "r" * (len(headers) - 3)))



if __name__ == "__main__":
    main()
