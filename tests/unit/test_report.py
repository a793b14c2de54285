"""``ckpt_wrapper.report`` and ``ckpt-wrapper inspect``: what a step saves, recomputes and peaks at, per block."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import ckpt_wrapper
from ckpt_wrapper import ActivationWrapper, by_class_name
from ckpt_wrapper.measure import live_bytes_after_forward
from ckpt_wrapper.tools import cli
from probes import single_thread  # noqa: F401  (a fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)


@pytest.fixture(scope="module")
def llama_report():
    """(model, batch, report) for a tiny HF LlamaForCausalLM planned at 0.3 with AdamW."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    batch = {"input_ids": torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1)),
             "use_cache": False}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = ckpt_wrapper.report(model, batch, memory_budget=0.3, optimizer=torch.optim.AdamW,
                                 check_fn=by_class_name("LlamaDecoderLayer"))
    return model, batch, params, result


def test_report_lists_what_each_llama_layer_saves_with_op_module_shape_dtype_and_bytes(llama_report) -> None:
    """Unwrapped, every decoder layer saves tensors, each named by the aten op and the sub-module that made
    it, with shape, dtype and bytes that agree; the total is the bytes forward leaves alive, measured
    independently (``live_bytes_after_forward``), less the output.

    A failure means the report attributes saved tensors to the wrong place, or misses some.
    """
    model, batch, _, result = llama_report
    by_block = result.before.by_block()
    for i in range(LLAMA["num_hidden_layers"]):
        assert by_block.get(f"model.layers.{i}", 0) > 0, by_block
    for row in result.before.saved:
        assert row["op"].startswith("aten.") and row["dtype"] == "float32", row
        assert row["bytes"] >= 4 * max(1, int(torch.tensor(row["shape"]).prod())) or row["shape"] == [], row
    layer_rows = [r for r in result.before.saved if r["block"] == "model.layers.1"]
    assert any(r["module"].startswith("model.layers.1.mlp") for r in layer_rows), layer_rows
    live = live_bytes_after_forward(lambda: model(**batch).logits, exclude=model.parameters())
    assert result.before.saved_bytes == live


def test_report_shows_the_plan_recomputing_what_it_no_longer_saves(llama_report) -> None:
    """With the plan: a checkpointed layer saves less and reruns ops in backward; an unwrapped layer saves
    the same and reruns nothing; the predicted peak is within 5% of the measured one.

    A failure means the report cannot show what a strategy changes, or its peaks disagree.
    """
    _, _, _, result = llama_report
    before, after = result.before.by_block(), result.after.by_block()
    changed = 0
    for entry in result.plan.entries:
        recomputed = sum(n for m, n in result.after.recomputed.items() if m.startswith(entry.name + "."))
        if entry.strategy.main in ("full", "regions"):
            assert after.get(entry.name, 0) < before[entry.name] and recomputed > 0, (entry, after, recomputed)
            changed += 1
        elif entry.strategy.main == "none" and not entry.strategy.cheap:
            assert after.get(entry.name, 0) == before[entry.name] and recomputed == 0, entry
    assert changed, str(result.plan)
    predicted = result.plan.peak["peak_bytes"]
    assert abs(predicted / result.after.measured_peak - 1) <= 0.05, str(result)
    text = str(result)
    assert "model.layers.2" in text and "step peak, planned: measured" in text and "predicted" in text


def test_report_leaves_the_model_untouched(llama_report) -> None:
    """The model reported on is not wrapped and its parameters and gradients are unchanged.

    A failure means reporting modifies the user's model (it must work on copies).
    """
    model, _, params, _ = llama_report
    assert not any(isinstance(m, ActivationWrapper) for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]) and p.grad is None, name


def test_timeline_png_is_written_and_without_matplotlib_the_error_says_so(llama_report, tmp_path, monkeypatch) -> None:
    """``save_timeline`` writes a PNG; with matplotlib unavailable it raises ``RuntimeError`` naming it.

    A failure means the plot silently does nothing, or fails with an ImportError deep inside.
    """
    _, _, _, result = llama_report
    pytest.importorskip("matplotlib")
    path = tmp_path / "step.png"
    result.save_timeline(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(RuntimeError, match="needs matplotlib"):
        result.save_timeline(str(tmp_path / "none.png"))


def test_inspect_command_prints_the_report_and_writes_the_png(tmp_path, capsys, monkeypatch) -> None:
    """``ckpt-wrapper inspect`` on a tiny GPT with a budget prints the per-block table and both peaks, and
    writes the PNG; a fractional ``--memory-limit`` is one line on stderr and exit 2.

    Failed before: there was no ``inspect`` subcommand (exit 2, ``invalid choice``).
    """
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    path = tmp_path / "step.png"
    status = cli.main(["inspect", "--model", "test_plan_command:tiny_gpt", "--memory-budget", "0.3",
                       "--optimizer", "adamw", "--png", str(path)])
    out = capsys.readouterr().out
    assert status == 0 and "layers.2" in out and "step peak, planned: measured" in out, out
    assert path.exists()
    try:
        status = cli.main(["inspect", "--model", "test_plan_command:tiny_gpt", "--memory-limit", "0.5"])
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--memory-limit" in err[0], err
