"""How the planner chooses, on a small preset (GPT-2, 124M): fast enough to run for every change.

Each plan is checked against what the strategy promises (docs/planning.md, "How the planner
decides"): which strategy, which devices, and every device row computed from the memory model's
constants, so that a wrong sum, branch or limit shows as a wrong number. tests/test_plan.py plans
the large presets these strategies are for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

import omnifix
from omnifix import Workload, plan_placement
from omnifix._plan.budgets import UNLIMITED, Budget, resolve_budgets
from omnifix._plan.estimate import CALIBRATION
from omnifix._plan.skeleton import load_skeleton
from omnifix._plan.strategies import Request, evaluate, fill
from omnifix._units import format_bytes

if TYPE_CHECKING:
    from omnifix import DeviceBudget, PlacementPlan

MIB = 2**20
GIB = 2**30
MODEL = "gpt2"


def _last_token_logits() -> bool:
    import inspect

    from transformers import GPT2LMHeadModel

    return "logits_to_keep" in inspect.signature(GPT2LMHeadModel.forward).parameters


# The budgets below are sized for a GPT-2 whose generate computes one row of logits per step;
# where its forward takes no logits_to_keep (transformers 4.45), every prompt token's logits
# make it another model. tests/test_plan.py plans every release's models.
pytestmark = pytest.mark.skipif(
    not _last_token_logits(), reason="GPT-2 takes no logits_to_keep in this transformers"
)


@pytest.fixture(autouse=True)
def _default_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan for the default CUDA allocator unless a test sets another."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)


def _plan(budgets: dict[object, str | int], **kwargs: object) -> PlacementPlan:
    return plan_placement(MODEL, budgets=budgets, **kwargs)  # type: ignore[arg-type]


def _need(row: DeviceBudget) -> int:
    return row.total + row.margin


def _utilisation(row: DeviceBudget) -> float:
    return _need(row) / row.budget


def _gpu_need(**kwargs: object) -> DeviceBudget:
    """The row of the whole model on one GPU large enough for it."""
    return _plan({0: "80GiB"}, **kwargs).device("cuda:0")


def _used(row: DeviceBudget) -> bool:
    return row.weights > 0 or row.kv_cache > 0 or row.activations > 0


def assert_rows_add_up(
    plan: PlacementPlan,
    budgets: dict[str, int],
    *,
    allow_offload: bool = False,
    expandable: bool = False,
) -> None:
    """Every row as the memory model's constants make it, from its weights, cache and activations.

    ``budgets`` by device name; a device without one has none (0), except the disk that offload
    may fill without limit.
    """
    cal = CALIBRATION
    for row in plan.devices:
        gpu = row.device.startswith("cuda:")
        if row.device in budgets:
            assert row.budget == budgets[row.device], row
        else:
            unlimited = row.device == "disk" and allow_offload
            assert row.budget == (UNLIMITED if unlimited else 0), row
        if not _used(row):
            assert (row.overhead, row.allocator, row.margin, row.phase) == (0, 0, 0, ""), row
            continue
        # Explicit budgets have to hold the CUDA context too.
        assert row.overhead == (cal.workspace + cal.cuda_context if gpu else 0), row
        allocated = row.weights + row.kv_cache + row.activations
        if row.device == "disk":
            assert row.margin == 0, row
        else:
            expected = int(
                cal.margin_bytes + cal.margin_fraction * (row.kv_cache + row.activations)
            )
            if gpu and expandable:  # room for the worst allocator gap beyond the point estimate
                spread = cal.reserved_gap_expandable_worst - cal.reserved_gap_expandable
                expected += int(spread * allocated)
            assert row.margin == expected, row
        if not gpu:
            assert row.allocator == 0, row
        elif expandable:
            assert row.allocator == int(cal.reserved_gap_expandable * allocated), row
        else:
            assert row.allocator >= int(cal.reserved_gap * allocated), row
    assert plan.fits == all(row.fits for row in plan.devices)


def _bytes_of(budgets: dict[object, str | int]) -> dict[str, int]:
    return {b.device: b.size for b in resolve_budgets(budgets, allow_offload=False)}


# --------------------------------------------------------------------------------------------
# One device
# --------------------------------------------------------------------------------------------


def test_the_whole_model_on_the_one_gpu_it_fits_and_the_reason_gives_its_numbers() -> None:
    budgets: dict[object, str | int] = {0: "2GiB"}
    plan = _plan(budgets)
    assert (plan.strategy, plan.device_map, plan.fits) == ("single", {"": "cuda:0"}, True)
    assert_rows_add_up(plan, _bytes_of(budgets))
    (row,) = plan.devices
    # 256 new tokens on a 512-token prompt: the last decode step, with the whole cache, is the peak.
    assert row.phase == "decode"
    assert row.kv_cache > 0
    assert row.activations > 0
    # bf16 weights on a GPU: the half of what the same model takes in fp32 on the cpu, but for
    # buffers, which may keep their dtype (4.57's GPT-2 keeps a causal mask per layer).
    fp32 = _plan({"cpu": "4GiB"}).device("cpu").weights
    skeleton = load_skeleton(MODEL, model_class=None, dtype=torch.bfloat16)
    buffers = sum(b.numel() * b.element_size() for b in skeleton.model.buffers())
    assert abs(2 * row.weights - fp32) <= buffers
    assert plan.reason == (
        f"everything fits on cuda:0 ({format_bytes(row.total)} predicted peak + "
        f"{format_bytes(row.margin)} margin of 2.0 GiB): one device, no hooks and no copies "
        "between devices"
    )


def test_the_largest_gpu_is_tried_first_and_the_first_of_equals_wins() -> None:
    need = _need(_gpu_need())
    small, large = need - MIB, need + MIB
    plan = _plan({0: small, 1: large})
    assert (plan.strategy, plan.device_map) == ("single", {"": "cuda:1"})
    assert [_used(row) for row in plan.devices] == [False, True]
    assert plan.device("cuda:1").budget == large
    # The same numbers on either GPU, whichever is named first.
    assert _plan({1: large, 0: large}).device_map == {"": "cuda:0"}
    assert _plan({0: large, 1: large}).device_map == {"": "cuda:0"}
    assert _plan({2: large, 1: large}).device_map == {"": "cuda:1"}
    # Exactly the need fits: the margin is included, not added twice.
    assert _plan({0: need}).strategy == "single"
    assert _plan({0: need - 1}).strategy != "single"


def test_the_memory_model_constants_make_each_row() -> None:
    row = _gpu_need()
    allocated = row.weights + row.kv_cache + row.activations
    # GPT-2's activation blocks are small: the allocator's share of the peak is what it keeps.
    assert row.allocator == int(CALIBRATION.reserved_gap * allocated)
    assert row.overhead == CALIBRATION.workspace + CALIBRATION.cuda_context
    cpu = _plan({"cpu": "4GiB"}).device("cpu")
    assert (cpu.overhead, cpu.allocator) == (0, 0)
    assert cpu.margin == int(
        CALIBRATION.margin_bytes + CALIBRATION.margin_fraction * (cpu.kv_cache + cpu.activations)
    )


def test_expandable_segments_keep_a_smaller_share_reserved(monkeypatch: pytest.MonkeyPatch) -> None:
    default = _gpu_need()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    budgets: dict[object, str | int] = {0: "2GiB"}
    plan = _plan(budgets)
    assert_rows_add_up(plan, _bytes_of(budgets), expandable=True)
    row = plan.device("cuda:0")
    allocated = row.weights + row.kv_cache + row.activations
    assert row.allocator == int(CALIBRATION.reserved_gap_expandable * allocated)
    assert row.allocator < default.allocator
    assert row.total == default.total - default.allocator + row.allocator


def test_eager_attention_reserves_a_share_of_its_score_blocks() -> None:
    work = Workload(text_tokens=1000)
    row = _gpu_need(attn_implementation="eager", workload=work)
    sdpa = _gpu_need(attn_implementation="sdpa", workload=work)
    allocated = row.weights + row.kv_cache + row.activations
    # The attention scores make the activations large; the allocator keeps fresh score blocks,
    # more than its share of the peak and at least 40 % of the activations.
    assert row.activations > 5 * sdpa.activations
    assert row.allocator > int(CALIBRATION.reserved_gap * allocated)
    assert row.allocator >= int(CALIBRATION.eager_block_fraction * row.activations)
    assert sdpa.allocator < row.allocator


def test_quantised_weights_dequantised_for_the_prefill_are_counted_where_they_run() -> None:
    plain = _gpu_need()
    int8 = _gpu_need(quantization="int8")
    assert int8.weights < plain.weights
    # The largest quantised weight, the MLP's 768 x 3072 projection, dequantised to bf16.
    assert int8.activations - plain.activations == 768 * 3072 * 2


def test_in_a_quantised_split_each_gpu_counts_the_weights_it_dequantises() -> None:
    budgets: dict[object, str | int] = {0: "1000MiB", 1: "1000MiB"}
    plan = _plan(budgets, quantization="int8")
    assert plan.strategy == "split"
    # The same map unquantised: every GPU runs MLP layers, so each holds one dequantised weight.
    skeleton = load_skeleton(MODEL, model_class=None, dtype=torch.bfloat16)
    budget = resolve_budgets(budgets, allow_offload=False)
    request = Request(skeleton, budget, "sdpa", Workload(), allow_offload=False)
    plain = evaluate(request, plan.device_map)
    for device in plan.devices_used:
        extra = plan.device(device).activations - plain.row(device).activations
        assert extra == 768 * 3072 * 2, device


def test_free_memory_measured_now_has_already_paid_for_the_cuda_context() -> None:
    skeleton = load_skeleton(MODEL, model_class=None, dtype=torch.bfloat16)
    explicit = Budget("cuda:0", 80 * GIB)
    measured = Budget("cuda:0", 80 * GIB, measured=True)
    rows = [
        evaluate(
            Request(skeleton, (budget,), "sdpa", Workload(), allow_offload=False), {"": "cuda:0"}
        ).rows
        for budget in (explicit, measured)
    ]
    (paid,), (free,) = rows[0], rows[1]
    assert paid.overhead == CALIBRATION.workspace + CALIBRATION.cuda_context
    # Measured free memory has paid what CUDA starts with, not the kernels loaded later.
    kernels = CALIBRATION.cuda_context - CALIBRATION.cuda_context_at_init
    assert free.overhead == CALIBRATION.workspace + kernels
    assert paid.total - free.total == CALIBRATION.cuda_context_at_init


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _layer_index(name: str) -> int | None:
    prefix = "transformer.h."
    return int(name[len(prefix) :]) if name.startswith(prefix) else None


def _layers(plan: PlacementPlan) -> list[str]:
    """The device of each decoder layer, in order."""
    prefix = "transformer.h."
    return [
        device
        for _, device in sorted(
            (int(name[len(prefix) :]), device)
            for name, device in plan.device_map.items()
            if name.startswith(prefix)
        )
    ]


def test_a_model_no_gpu_holds_is_split_in_order_then_balanced() -> None:
    one = _gpu_need()
    budgets: dict[object, str | int] = {0: "1020MiB", 1: "1020MiB", 2: "1020MiB"}
    plan = _plan(budgets)
    assert plan.strategy == "split"
    assert_rows_add_up(plan, _bytes_of(budgets))
    assert plan.devices_used == ("cuda:0", "cuda:1")  # two are enough: the third stays empty
    layers = _layers(plan)
    assert layers == sorted(layers)
    assert plan.device_map["transformer.wte"] == "cuda:0"
    assert plan.device_map["transformer.ln_f"] == "cuda:1"
    # GPT-2's lm_head is tied to the input embeddings: it goes back to their GPU.
    assert plan.device_map["lm_head"] == "cuda:0"
    assert plan.input_device == torch.device("cuda", 0)
    rows = [plan.device("cuda:0"), plan.device("cuda:1")]
    # Every parameter once: the weights add up to the single GPU's.
    assert sum(row.weights for row in plan.devices) == one.weights
    # Each GPU got layers, and the KV cache of its layers with them.
    assert sum(row.kv_cache for row in rows) == one.kv_cache
    assert all(row.kv_cache > 0 for row in rows)
    shares = [100 * _utilisation(row) for row in rows]
    low, high = min(shares), max(shares)
    assert plan.reason == (
        f"no single GPU holds it ({format_bytes(_need(one))} needed, cuda:0 has 1020.0 MiB); "
        "split into 2 contiguous blocks over cuda:0, cuda:1, each GPU's budget reduced by its "
        "own KV cache, activation peak and overhead first, then balanced to within "
        f"{100 * (high / low - 1):.1f} % predicted utilisation ({low:.1f}-{high:.1f} % of each "
        "GPU's budget)"
    )


def _layer_step(plan: PlacementPlan) -> float:
    """The largest change in a GPU's utilisation that moving one decoder layer makes."""
    one = _gpu_need(workload=plan.workload)
    layers = len(_layers(plan))
    per_layer = (one.weights / layers + one.kv_cache / layers) * (1 + CALIBRATION.margin_fraction)
    return per_layer / min(row.budget for row in plan.devices)


def _request(budgets: dict[object, str | int], work: Workload) -> Request:
    skeleton = load_skeleton(MODEL, model_class=None, dtype=torch.bfloat16)
    return Request(
        skeleton, resolve_budgets(budgets, allow_offload=False), "sdpa", work, allow_offload=False
    )


@pytest.mark.parametrize(
    "sizes",
    [(1040, 1040), (990, 1040), (1040, 990), (1090, 940), (920, 990, 1040)],
    ids=str,
)
def test_a_split_balances_the_used_gpus_within_a_layer(sizes: tuple[int, ...]) -> None:
    # MiB: GPT-2 in bf16 needs 1.1 GiB on one GPU, 853 MiB of it the CUDA context and margin.
    budgets: dict[object, str | int] = {i: size * MIB for i, size in enumerate(sizes)}
    work = Workload(text_tokens=256, max_new_tokens=64)
    plan = _plan(budgets, workload=work)
    assert plan.strategy == "split"
    assert plan.fits
    assert_rows_add_up(plan, _bytes_of(budgets))
    layers = _layers(plan)
    assert layers == sorted(layers, key=lambda device: int(device[5:]))
    used = [plan.device(device) for device in plan.devices_used]
    assert len(used) >= 2
    assert len(set(layers)) == len(used)
    shares = [_utilisation(row) for row in used]
    # Filled in order, the first GPUs are full; balanced, no used GPU is more than about a layer
    # more utilised than another, and the fullest is no fuller than in the filled map.
    request = _request(budgets, work)
    filled = fill(request, request.gpus)
    assert filled.fits
    assert max(shares) <= max(_utilisation(filled.row(device)) for device in plan.devices_used)
    assert max(shares) - min(shares) <= 2 * _layer_step(plan)
    # No other boundary between the two GPUs' layers lowers the highest utilisation.
    first, second = plan.devices_used
    peaks = []
    for boundary in range(len(layers) + 1):
        device_map = {
            name: (first if index < boundary else second)
            if (index := _layer_index(name)) is not None
            else device
            for name, device in plan.device_map.items()
        }
        attempt = evaluate(request, device_map)
        if attempt.fits:
            peaks.append(max(_utilisation(attempt.row(d)) for d in plan.devices_used))
    assert max(shares) == pytest.approx(min(peaks), abs=1e-9)


def test_unequal_gpus_are_balanced_by_utilisation_not_bytes() -> None:
    budgets: dict[object, str | int] = {0: "1100MiB", 1: "950MiB"}
    plan = _plan(budgets, workload=Workload(text_tokens=256, max_new_tokens=64))
    assert plan.strategy == "split"
    large, small = plan.device("cuda:0"), plan.device("cuda:1")
    assert abs(_utilisation(small) - _utilisation(large)) <= 2 * _layer_step(plan)
    assert large.weights > small.weights


@pytest.mark.parametrize("sizes", [(12, 12), (10, 14), (14, 10), (16, 9)], ids=str)
def test_a_split_of_many_layers_is_balanced_to_within_a_layer_of_the_best(
    sizes: tuple[int, int],
) -> None:
    # Qwen3-8B: 36 layers of 0.4 GiB, so the balancing pass has to narrow its bracket.
    budgets: dict[object, str | int] = {i: size * GIB for i, size in enumerate(sizes)}
    work = Workload(text_tokens=2048)
    plan = plan_placement("qwen3-8b", budgets=budgets, workload=work)
    assert plan.strategy == "split"
    skeleton = load_skeleton("qwen3-8b", model_class=None, dtype=torch.bfloat16)
    resolved = resolve_budgets(budgets, allow_offload=False)
    request = Request(skeleton, resolved, plan.attn_implementation, work, allow_offload=False)
    first, second = plan.devices_used
    prefix = "model.layers."
    layers = [name for name in plan.device_map if name.startswith(prefix)]
    peaks = []
    for boundary in range(len(layers) + 1):
        device_map = {
            name: (first if int(name[len(prefix) :]) < boundary else second)
            if name.startswith(prefix)
            else device
            for name, device in plan.device_map.items()
        }
        attempt = evaluate(request, device_map)
        if attempt.fits:
            peaks.append(max(_utilisation(attempt.row(d)) for d in plan.devices_used))
    highest = max(_utilisation(plan.device(d)) for d in plan.devices_used)
    # A layer (with its margin) on each side of the boundary, as tests/test_plan.py allows.
    layer = skeleton.sizes[layers[0]] * (1 + CALIBRATION.margin_fraction)
    assert min(peaks) <= highest <= min(peaks) + 2 * layer / (min(sizes) * GIB)
    filled = fill(request, request.gpus)
    assert highest <= max(_utilisation(filled.row(d)) for d in plan.devices_used)


@pytest.mark.parametrize(
    ("sizes", "layers"),
    [
        ((12, 12), [17, 19]),
        ((10, 14), [13, 23]),
        ((14, 10), [22, 14]),
        ((16, 9), [25, 11]),
        ((11, 13), [15, 21]),
        ((13, 11), [20, 16]),
        ((12, 12, 12), [17, 19]),
        ((8, 9, 10), [8, 13, 15]),
    ],
    ids=str,
)
def test_the_balancing_pass_splits_qwen3_8b_as_it_did(
    sizes: tuple[int, ...], layers: list[int]
) -> None:
    # What the bisection settles on (docs/planning.md): a change to it shows here first; the
    # tests above say what any balancing must hold.
    budgets: dict[object, str | int] = {i: size * GIB for i, size in enumerate(sizes)}
    plan = plan_placement("qwen3-8b", budgets=budgets, workload=Workload(text_tokens=2048))
    assert plan.strategy == "split"
    prefix = "model.layers."
    counts = [
        sum(1 for name, where in plan.device_map.items() if name.startswith(prefix) and where == d)
        for d in plan.devices_used
    ]
    assert counts == layers


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def _shortfalls(plan: PlacementPlan, budgets: dict[str, int]) -> str:
    parts = []
    for row in plan.devices:
        if row.fits:
            continue
        if row.device in budgets:
            parts.append(f"{row.device} {format_bytes(-row.headroom)} short")
        elif row.weights:
            parts.append(f"{format_bytes(row.weights)} of weights fit on no GPU")
    return ", ".join(parts)


def test_one_gpu_too_small_refuses_with_the_single_gpu_attempt() -> None:
    one = _gpu_need()
    budgets: dict[object, str | int] = {0: _need(one) - 100 * MIB}
    plan = _plan(budgets)
    assert (plan.strategy, plan.fits, plan.device_map) == ("refuse", False, {"": "cuda:0"})
    assert_rows_add_up(plan, _bytes_of(budgets))
    assert -plan.device("cuda:0").headroom == 100 * MIB
    assert plan.reason == (
        f"it needs {format_bytes(_need(one))} in all and no placement on these GPUs fits "
        f"(cuda:0 {format_bytes(100 * MIB)} short); offload is off"
    )
    assert plan.input_device is None


def test_gpus_too_small_together_refuse_with_the_closest_split_and_its_overflow() -> None:
    budgets: dict[object, str | int] = {0: "1000MiB", 1: "900MiB"}
    plan = _plan(budgets)
    assert plan.strategy == "refuse"
    assert_rows_add_up(plan, _bytes_of(budgets))
    # The closest attempt is the split, filled in order: both GPUs, then what fits on neither.
    assert list(dict.fromkeys(plan.device_map.values())) == ["cuda:0", "cuda:1", "disk"]
    disk = plan.device("disk")
    assert disk.weights > 0
    assert disk.budget == 0
    assert sum(row.weights for row in plan.devices) == _gpu_need().weights
    # Filled to the limit: the GPUs fit, or are short by less than the layer they took.
    shortfalls = _shortfalls(plan, _bytes_of(budgets))
    assert "of weights fit on no GPU" in shortfalls
    total = format_bytes(sum(_need(row) for row in plan.devices))
    assert plan.reason == (
        f"it needs {total} in all and no placement on these GPUs fits ({shortfalls}); "
        "offload is off"
    )


def test_a_gpu_that_can_compute_nothing_is_no_offload() -> None:
    # 700 MiB is less than the CUDA context and the margin: every module would go to the cpu.
    budgets: dict[object, str | int] = {0: "700MiB", "cpu": "4GiB"}
    plan = _plan(budgets, allow_offload=True)
    assert plan.strategy == "refuse"
    assert plan.device_map == {"": "cuda:0"}
    assert plan.reason.endswith("short)")  # offload was on: no "offload is off"


# --------------------------------------------------------------------------------------------
# Offload
# --------------------------------------------------------------------------------------------


def test_offload_fills_the_gpu_then_streams_the_rest_from_the_cpu() -> None:
    one = _gpu_need()
    budgets: dict[object, str | int] = {0: "1000MiB", "cpu": "2GiB"}
    plan = _plan(budgets, allow_offload=True)
    assert plan.strategy == "offload"
    assert plan.fits
    assert_rows_add_up(plan, _bytes_of(budgets), allow_offload=True)
    assert list(dict.fromkeys(plan.device_map.values())) == ["cuda:0", "cpu"]
    gpu, cpu = plan.device("cuda:0"), plan.device("cpu")
    assert gpu.weights + cpu.weights == one.weights
    # The cpu only holds weights; every layer computes on the GPU, with its KV cache.
    assert (cpu.kv_cache, cpu.activations, cpu.overhead) == (0, 0, 0)
    assert gpu.kv_cache == one.kv_cache
    # The GPU also holds the largest offloaded module while it runs.
    assert gpu.activations > one.activations
    # The GPU is filled: what is left of its budget holds no further layer with its KV cache.
    blocks = [
        n for n, d in plan.device_map.items() if d == "cpu" and n.startswith("transformer.h.")
    ]
    # One offloaded block's weights (the cpu holds only blocks and the final norm) and KV cache.
    layer = cpu.weights / len(blocks) + one.kv_cache / 12
    assert 0 <= gpu.headroom < layer * (1 + CALIBRATION.margin_fraction)
    assert plan.reason == (
        f"the GPUs cannot hold it; allow_offload=True puts {format_bytes(cpu.weights)} of weights "
        "on cpu, copied to cuda:0 one module at a time for every forward pass (much slower than "
        "a GPU-only placement)"
    )
    assert plan.input_device == torch.device("cuda", 0)


def test_offload_goes_to_disk_past_the_cpu_budget() -> None:
    one = _gpu_need()
    budgets: dict[object, str | int] = {0: "1000MiB", "cpu": "150MiB"}
    plan = _plan(budgets, allow_offload=True)
    assert plan.strategy == "offload"
    assert_rows_add_up(plan, _bytes_of(budgets), allow_offload=True)
    assert list(dict.fromkeys(plan.device_map.values())) == ["cuda:0", "cpu", "disk"]
    gpu, cpu, disk = plan.device("cuda:0"), plan.device("cpu"), plan.device("disk")
    assert gpu.weights + cpu.weights + disk.weights == one.weights
    assert disk.budget == UNLIMITED
    assert cpu.fits
    assert cpu.weights > 0
    assert disk.margin == 0
    assert plan.reason.startswith(
        f"the GPUs cannot hold it; allow_offload=True puts {format_bytes(cpu.weights)} of "
        f"weights on cpu and {format_bytes(disk.weights)} of weights on disk, copied to cuda:0 "
    )
    # Too little cpu for even its margin: everything offloaded goes to disk.
    plan = _plan({0: "1000MiB", "cpu": "60MiB"}, allow_offload=True)
    assert list(dict.fromkeys(plan.device_map.values())) == ["cuda:0", "disk"]
    assert "of weights on disk, copied to cuda:0" in plan.reason
    assert "on cpu" not in plan.reason


def test_offload_without_a_cpu_budget_uses_the_host_memory_free_now() -> None:
    plan = _plan({0: "1000MiB"}, allow_offload=True)
    assert plan.strategy == "offload"
    cpu = plan.device("cpu")
    assert cpu.weights > 0
    assert cpu.budget > cpu.weights  # psutil's available memory, at least what it holds


# --------------------------------------------------------------------------------------------
# The cpu alone
# --------------------------------------------------------------------------------------------


def test_the_cpu_alone_holds_the_model_in_fp32() -> None:
    budgets: dict[object, str | int] = {"cpu": "2GiB"}
    plan = _plan(budgets)
    assert (plan.strategy, plan.device_map, plan.dtype) == ("single", {"": "cpu"}, torch.float32)
    assert_rows_add_up(plan, _bytes_of(budgets))
    row = plan.device("cpu")
    assert plan.reason.startswith(
        f"everything fits on cpu ({format_bytes(row.total)} predicted peak + "
        f"{format_bytes(row.margin)} margin of 2.0 GiB)"
    )


def test_too_little_host_memory_refuses_or_offloads_to_disk() -> None:
    need = _need(_plan({"cpu": "4GiB"}).device("cpu"))
    plan = _plan({"cpu": "300MiB"})
    assert plan.strategy == "refuse"
    assert plan.device_map == {"": "cpu"}
    assert plan.reason == (
        f"it needs {format_bytes(need)} of host memory and has 300.0 MiB; offload is off"
    )
    # With offload, what the cpu cannot hold goes to disk and the cpu computes.
    budgets: dict[object, str | int] = {"cpu": "500MiB"}
    offloaded = _plan(budgets, allow_offload=True)
    assert offloaded.strategy == "offload"
    assert_rows_add_up(offloaded, _bytes_of(budgets), allow_offload=True)
    assert list(dict.fromkeys(offloaded.device_map.values())) == ["cpu", "disk"]
    disk = offloaded.device("disk")
    assert f"puts {format_bytes(disk.weights)} of weights on disk, copied to cpu " in (
        offloaded.reason
    )
    # Offload on, yet too little even for the cpu's share: the refusal says no more than why.
    refused = _plan({"cpu": "200MiB"}, allow_offload=True)
    assert refused.strategy == "refuse"
    assert refused.reason == f"it needs {format_bytes(need)} of host memory and has 200.0 MiB"


def test_budgets_without_a_device_that_computes_are_refused() -> None:
    with pytest.raises(omnifix.InvalidArgumentError, match="nothing can compute") as caught:
        _plan({"disk": "1GiB"}, allow_offload=True)
    assert "{'cpu': '64GiB'}" in str(caught.value)
