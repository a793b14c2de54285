"""The planner's default is deterministic, and ``memory_limit`` bounds a training step's measured peak.

The measured peak comes from PyTorch's ``MemTracker`` (``ckpt_wrapper.measure.measured_step_peak``), which
counts live storages by its own bookkeeping, not the planner's recorder: parameters, gradients,
optimizer state (after one warm-up step, as in steady training) and every tensor the step makes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ckpt_wrapper
from ckpt_wrapper import Plan, PlanOptions, by_class_name
from ckpt_wrapper.measure import measured_step_peak
from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.planner.memory import StaticMemory
from ckpt_wrapper.planner.profile import find_blocks
from ckpt_wrapper.testing.models import GPT, GPTConfig
from probes import single_thread  # noqa: F401  (a fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("single_thread")

GPT_CONFIG = GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=32, vocab_size=128)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)
PEAK_TOLERANCE = 0.05
"""Predicted against measured peak: the issue's bar."""


def _gpt() -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    return GPT(GPT_CONFIG), torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


def _llama() -> tuple[nn.Module, dict]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "use_cache": False}


def _measure(model: nn.Module, plan: Plan, batch: object, make_optimizer) -> int:
    """Apply ``plan`` to a copy, take one warm-up step, then measure the peak of the next."""
    applied = copy.deepcopy(model)
    plan.apply(applied)
    optimizer = make_optimizer(applied.parameters()) if make_optimizer else None

    def step() -> None:
        out = applied(**batch) if isinstance(batch, dict) else applied(batch)
        (out.logits if hasattr(out, "logits") else out).sum().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        else:
            applied.zero_grad()

    step()
    return measured_step_peak(step, applied, optimizer)


def test_default_plan_is_byte_identical_across_runs() -> None:
    """Two ``plan`` calls with the same model, batch and options, all else default, give byte-identical JSON,
    with a fractional budget and with a peak limit; the JSON holds the calibration the cost used.

    Failed before: the default cost timed every strategy on CPU (``cost="auto"``) and the plan stored the
    measured step time, so reruns differed in text and could differ in the strategies chosen.
    """
    model, tokens = _gpt()
    for bounds in (dict(memory_budget=0.4), dict(memory_limit=3_700_000, optimizer=torch.optim.AdamW)):
        first, second = (ckpt_wrapper.plan(model, tokens, **bounds).to_json() for _ in range(2))
        assert first == second, bounds
    plan = Plan.from_json(first)
    assert plan.calibration == Calibration.default("cpu").to_dict() and plan.cost_unit == "seconds"
    assert Plan.from_json(first).to_json() == first


def test_a_given_calibration_is_used_and_stored() -> None:
    """``calibration=`` changes the modelled costs and is stored in the plan.

    A failure means the calibration is ignored (costs stay the defaults') or not kept with the plan.
    """
    model, tokens = _gpt()
    slow_ops = Calibration(seconds_per_flop=1e-11, seconds_per_byte=1e-11, seconds_per_op=1e-3, seconds_per_mode_op=0.0,
                           source="test")
    plan = ckpt_wrapper.plan(model, tokens, memory_budget=0.4, calibration=slow_ops)
    default = ckpt_wrapper.plan(model, tokens, memory_budget=0.4)
    assert plan.calibration == slow_ops.to_dict()
    assert plan.step_seconds != default.step_seconds


def test_a_calibration_fitted_to_the_models_step_starts_the_plan_from_that_step() -> None:
    """``Calibration.fit`` times the model's own step and fits the FLOP rate to it, leaving the model as it was.

    The fitted calibration models the unwrapped step the planner records to the measured seconds, so a plan
    made with it predicts the unwrapped step at exactly that time. A failure means the fit models another
    step than the planner's, or that fitting changed the model (its gradients, buffers, mode or RNG).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 64))
    batch = torch.randn(32, 64)
    model(batch).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.random.get_rng_state()
    base = Calibration(seconds_per_flop=1e-11, seconds_per_byte=1e-12, seconds_per_op=1e-7, seconds_per_mode_op=0.0,
                       source="given")
    fitted = Calibration.fit(model, batch, base=base, repeats=3)
    assert fitted.source.startswith("given; FLOP rate fitted to a ")
    assert (fitted.seconds_per_byte, fitted.seconds_per_op) == (base.seconds_per_byte, base.seconds_per_op)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)

    seconds = float(fitted.source.split("fitted to a ")[1].split(" ms")[0]) / 1e3
    plan = ckpt_wrapper.plan(model, batch, memory_budget=1.0, check_fn=lambda m: isinstance(m, nn.Linear),
                             calibration=fitted)
    assert plan.step_seconds == pytest.approx(seconds, rel=1e-3)  # the source prints 0.1 us: rounding only
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        Calibration.fit(model, batch, base=base, repeats=0)
    with pytest.raises(ValueError, match="cannot fit the FLOP rate"):
        base.fitted(fitted_counts_without_flops(), 1.0)


def test_measuring_and_fitting_with_the_default_base_leave_the_global_rng_as_it_was() -> None:
    """``Calibration.measure`` (the default ``base`` of ``fit``) draws its kernels' inputs from a generator of
    its own, so measuring, and fitting without a ``base``, leave the caller's RNG where it was.

    A failure means a calibration changes what the user's next ``torch.randn`` or dropout mask draws.
    """
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.1), nn.Linear(16, 16))
    batch = torch.randn(4, 16)
    rng = torch.random.get_rng_state()
    Calibration.measure("cpu", repeats=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    Calibration.fit(model, batch, repeats=1)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_fitting_refuses_what_it_cannot_fit_with_an_error_that_says_what_was_expected() -> None:
    """``Calibration.fit`` and ``fitted`` refuse bad arguments up front, each saying what was expected and found.

    Failed on the code before the fix: a fractional ``repeats`` died in ``range`` (after a second of
    measuring), ``repeats=True`` was taken as 1, a ``base`` of the wrong type was an ``AttributeError``, a
    ``device`` other than the parameters' was timed and fitted silently (the base measured on one device,
    the step run on another), a model whose output needs no gradient died in autograd's own words, and
    ``fitted`` turned a NaN or infinite time into a NaN or infinite FLOP rate (stored in a plan's JSON).
    """
    from ckpt_wrapper.planner.cost import Counts

    base = Calibration(seconds_per_flop=1e-11, seconds_per_byte=1e-12, seconds_per_op=1e-7, seconds_per_mode_op=0.0)
    model, batch = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), torch.randn(4, 8)
    for repeats in (2.5, True, "3"):
        with pytest.raises(TypeError, match=f"repeats must be an int >= 1, got {type(repeats).__name__}"):
            Calibration.fit(model, batch, base=base, repeats=repeats)
    with pytest.raises(TypeError, match="base must be a Calibration.*got str"):
        Calibration.fit(model, batch, base="cpu", repeats=1)
    with pytest.raises(ValueError, match="device meta.*parameters are on cpu"):
        Calibration.fit(model, batch, device="meta", base=base, repeats=1)
    frozen = nn.Sequential(nn.Linear(8, 8)).requires_grad_(False)
    with pytest.raises(ValueError, match="no floating-point output that requires grad"):
        Calibration.fit(frozen, batch, base=base, repeats=1)
    assert all(p.grad is None for p in frozen.parameters())
    for seconds in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="a finite measured time"):
            base.fitted(Counts(flops=10**9, bytes=0, ops=0, mode_ops=0), seconds)


def test_the_recorder_counts_no_bytes_for_view_ops() -> None:
    """A view (``t``, ``view``, ``transpose``, ``split``, ``detach``) moves no data: the cost model's byte count
    leaves it out, while a copy of the same tensor counts its input and output.

    A failure means views are charged their whole storage each time (on the CPU reference workload that
    was 7x their measured time, 2% of the modelled step), so the model overstates what recompute reruns.
    """
    from ckpt_wrapper.timeline import StepRecorder

    x = torch.randn(64, 32)
    with StepRecorder() as views:
        x.t()
        x.view(32, 64).transpose(0, 1)
        x.split(16)
        x.detach()
    assert views.bytes_touched == 0 and len(views.ops) >= 5
    with StepRecorder() as copies:
        x.clone()
    assert copies.bytes_touched == 2 * x.numel() * x.element_size()


def fitted_counts_without_flops():
    from ckpt_wrapper.planner.cost import Counts
    return Counts(flops=0, bytes=10, ops=1, mode_ops=0)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum"])
def test_static_components_count_parameters_gradients_and_the_optimizers_state(optimizer) -> None:
    """Unsharded, the parameters component is every parameter's bytes and the optimizer state is 2 per
    parameter for AdamW and 1 for SGD with momentum, as the optimizer actually creates after a step.

    A failure means the optimizer's state is guessed, not measured, or parameters are miscounted.
    """
    model, _ = _gpt()
    make = (torch.optim.AdamW if optimizer == "adamw"
            else lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    static = StaticMemory.of(model, find_blocks(model, None), optimizer=make)
    real = make(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    real.step()
    state = sum(t.untyped_storage().nbytes() for s in real.state.values() for t in s.values() if t.dim() > 0)
    assert static.parameters == sum(p.numel() * p.element_size() for p in model.parameters())
    assert static.optimizer_state == state


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.1])
def test_predicted_step_peak_is_within_5_percent_of_memtracker_on_the_gpt(budget) -> None:
    """For the plan at each budget, with AdamW, the predicted peak of a whole step is within 5% of the peak
    PyTorch's MemTracker measures on the applied model.

    A failure means the peak model misses a component (optimizer state, gradients, a recompute buffer) or
    puts a block's working set at the wrong instant.
    """
    model, tokens = _gpt()
    plan = ckpt_wrapper.plan(model, tokens, memory_budget=budget, optimizer=torch.optim.AdamW)
    measured = _measure(model, plan, tokens, torch.optim.AdamW)
    predicted = plan.peak["peak_bytes"]
    assert abs(predicted / measured - 1) <= PEAK_TOLERANCE, f"predicted {predicted}, measured {measured}\n{plan}"
    assert sum(plan.peak["components"].values()) == predicted


def test_predicted_step_peak_is_within_5_percent_on_an_hf_llama() -> None:
    """The same on a tiny HF LlamaForCausalLM (no optimizer: the peak is activations and gradients).

    A failure means the decoder layers' working sets, measured alone, do not add up in the model.
    """
    model, batch = _llama()
    plan = ckpt_wrapper.plan(model, batch, memory_budget=0.3, check_fn=by_class_name("LlamaDecoderLayer"))
    measured = _measure(model, plan, batch, None)
    predicted = plan.peak["peak_bytes"]
    assert abs(predicted / measured - 1) <= PEAK_TOLERANCE, f"predicted {predicted}, measured {measured}\n{plan}"


def test_memory_limit_is_met_and_a_lower_limit_never_predicts_a_higher_peak() -> None:
    """Under a limit between the least reachable peak and the unwrapped one, the plan's predicted peak is
    within the limit, the measured peak within 5% of it, and a lower limit predicts no higher a peak.

    A failure means the solver ignores the peak (it bounds only activations after forward), or the bound
    it keeps is not the one measured.
    """
    model, tokens = _gpt()
    unwrapped = ckpt_wrapper.plan(model, tokens, memory_budget=1.0, optimizer=torch.optim.AdamW)
    top = unwrapped.peak["peak_bytes"]
    peaks = []
    for limit in (top - 100_000, top - 200_000):
        plan = ckpt_wrapper.plan(model, tokens, memory_limit=limit, optimizer=torch.optim.AdamW)
        assert plan.peak["peak_bytes"] <= limit == plan.limit_bytes, str(plan)
        measured = _measure(model, plan, tokens, torch.optim.AdamW)
        assert abs(plan.peak["peak_bytes"] / measured - 1) <= PEAK_TOLERANCE, f"measured {measured}\n{plan}"
        peaks.append(plan.peak["peak_bytes"])
    assert peaks[1] <= peaks[0]
    assert "step peak per rank: predicted" in str(plan)


def test_an_impossible_limit_names_the_least_reachable_peak_and_what_would_lower_it() -> None:
    """A limit below anything reachable raises ``ValueError`` with the least reachable peak, what it is made
    of, and the levers that apply: FSDP or more ranks always; offload and a smaller batch where activations
    set the least peak, and a leaner optimizer where its step does (activations are gone by then).

    A failure means an impossible limit returns a plan that does not fit, or an error that does not say
    how far off it is or what to change.
    """
    model, tokens = _gpt()
    with pytest.raises(ValueError) as caught:
        ckpt_wrapper.plan(model, tokens, memory_limit="1MiB")
    message = str(caught.value)
    for part in ("memory_limit=1.00 MiB", "least peak reachable", "at backward of", "parameters", "FSDP",
                 "offloading activations", "a smaller batch"):
        assert part in message, message
    with pytest.raises(ValueError) as caught:
        ckpt_wrapper.plan(model, tokens, memory_limit="1MiB", optimizer=torch.optim.AdamW)
    message = str(caught.value)
    for part in ("at optimizer step", "optimizer state", "FSDP", "would not lower it", "less state"):
        assert part in message, message
    with pytest.raises(ValueError, match="more ranks .* 2 now"):
        ckpt_wrapper.plan(model, tokens, memory_limit="1MiB", optimizer=torch.optim.AdamW, sharding="fsdp2",
                          world_size=2)


@pytest.mark.parametrize("fields, error", [
    (dict(memory_limit=0.5), "memory_limit=0.5: the limit is bytes"),
    (dict(), "memory_budget= .* or memory_limit="),
    (dict(memory_limit="1GiB", sharding="zero3"), "sharding must be one of"),
    (dict(memory_limit="1GiB", world_size=0), "world_size must be"),
])
def test_peak_options_are_checked_before_profiling(fields, error) -> None:
    """A fractional limit, no bound at all, an unknown sharding or a bad world size is a ``ValueError``.

    A failure means a mistyped option is ignored or fails later, deep in profiling.
    """
    with pytest.raises(ValueError, match=error):
        PlanOptions(**fields)
