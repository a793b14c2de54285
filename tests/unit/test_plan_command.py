"""``ckpt-wrapper plan``: plans a model in process, prints the table, saves JSON that loads and applies."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import torch

from ckpt_wrapper import Plan
from ckpt_wrapper.testing.models import GPT, GPTConfig
from ckpt_wrapper.tools import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16, vocab_size=64)


def tiny_gpt() -> GPT:
    """The ``--model`` of these tests (``test_plan_command:tiny_gpt``): three blocks of width 32."""
    return GPT(TINY)


def tiny_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``--batch-fn`` of these tests."""
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len), generator=torch.Generator().manual_seed(step))
    return tokens, tokens


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))


def test_plan_command_saves_a_plan_that_loads_and_applies(tmp_path, capsys, importable) -> None:
    """Plans a tiny GPT with ``--cost flops --measure saved``, prints the table, and ``--out`` writes JSON
    that ``Plan.load`` reads back equal and that applies to the model. Needs no batch function: the GPT
    names its vocabulary.

    Failed before: there was no ``plan`` subcommand (``invalid choice: 'plan'``, exit 2).
    """
    out = tmp_path / "plan.json"
    status = cli.main(["plan", "--model", "test_plan_command:tiny_gpt", "--memory-budget", "40%", "--cost", "flops",
                       "--measure", "saved", "--blocks", "Block", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0 and "activation memory: predicted" in printed and str(out) in printed, printed
    plan = Plan.load(str(out))
    assert [e.name for e in plan.entries] == ["layers.0", "layers.1", "layers.2"]
    assert plan.predicted_bytes <= plan.budget_bytes and plan.cost_unit == "flops"
    assert str(plan) in printed
    model = tiny_gpt()
    assert plan.apply(model)  # something was wrapped, and the model still trains
    model(tiny_batch(0)[0]).sum().backward()


def test_plan_command_takes_a_batch_function(capsys, importable) -> None:
    """``--batch-fn``'s step-0 inputs are the example batch; the default blocks are the largest ModuleList's."""
    status = cli.main(["plan", "--model", "test_plan_command:tiny_gpt", "--batch-fn", "test_plan_command:tiny_batch",
                       "--memory-budget", "0.9", "--cost", "flops", "--measure", "saved"])
    assert status == 0 and "layers.2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--memory-budget", "2.5"], "a fraction must be in (0, 1]"),
    (["--measure", "peak"], "invalid choice: 'peak'"),
    (["--model", "nomodule"], "expected 'module:callable', found 'nomodule'"),
    (["--model", "torch.nn:Identity"], "needs --batch-fn"),
    (["--blocks", "Nope"], "--blocks Nope: expected the class name(s) of the model's blocks"),
    (["--memory-budget", "1B"], "budget"),
    (["--repeats", "0"], "--repeats: expected an integer >= 1"),
], ids=["budget", "measure", "spec", "batch", "blocks", "unreachable", "repeats"])
def test_plan_command_bad_arguments_exit_2_with_one_line(argv, words, capsys, importable) -> None:
    """Bad flags, a model without a batch, blocks that match nothing, or a budget no plan reaches: exit 2 and one
    line on stderr, never a traceback."""
    try:
        status = cli.main(["plan", "--cost", "flops", "--measure", "saved", *argv])
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("ckpt-wrapper plan: error: "), err
    assert words in err[0], err


def test_documented_plan_commands_parse() -> None:
    """Every ``ckpt-wrapper plan`` command in the docs' bash blocks and the command's docstring parses.

    A failure means a documented plan command uses a flag that does not exist or a value that is refused.
    """
    from ckpt_wrapper.tools import plan_command

    texts = [block for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M)]
    texts.append("\n".join(ln for ln in plan_command.__doc__.splitlines() if ln.startswith("    ")))
    found = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #", 1)[0])
            for i, word in enumerate(words):
                if word in ("ckpt-wrapper", "ckpt_wrapper") and words[i + 1: i + 2] == ["plan"]:
                    found.append(words[i + 2:])
    assert len(found) >= 4, found
    parser = cli.build_parser()
    for flags in found:
        args = parser.parse_args(["plan", *flags])
        args._module.options_from_args(args)
