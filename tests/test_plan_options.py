"""Plans a user can act on: every refusal's options pasted as they are printed, offload that
streams one module at a time, bitsandbytes weights sized as transformers replaces them.

Quantised sizes are checked against real bitsandbytes models (``get_memory_footprint()`` plus
the quantisation state bitsandbytes keeps beside the weights) where bitsandbytes is installed.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers
from tests.bnb_models import (
    BNB,
    QUANTISATIONS,
    a_quantised_module,
    asked,
    needs_bnb,
    quantisation_state,
    save_tiny_gpt2,
)

import omnifix
import omnifix.testing as ot
from omnifix import PlacementPlan, Workload, plan_placement
from omnifix._cli import main

if TYPE_CHECKING:
    from pathlib import Path

    from omnifix.types import PlanOption

GIB = 2**30
#: A Qwen2-VL-family 7B that every stack has (Qwen2.5-VL needs 4.49).
VL_7B = "qwen2.5-vl-7b" if "qwen2.5-vl" in ot.available_families() else "qwen2-vl-7b"


def _paste(code: str) -> Any:
    """Run a printed call as a user would after ``import omnifix, torch, transformers``."""
    return eval(code, {"omnifix": omnifix, "torch": torch, "transformers": transformers})  # noqa: S307


def _assert_each_option_plans_what_it_says(plan: PlacementPlan) -> None:
    assert plan.strategy == "refuse"
    assert plan.options
    for option in plan.options:
        again = _paste(option.code)
        assert isinstance(again, PlacementPlan)
        assert again.fits, option.code
        assert again.strategy == option.strategy
        # The same prediction (the budget of a cpu nobody sized is the host's free memory now).
        assert [(r.device, r.total) for r in again.devices] == [
            (r.device, r.total) for r in option.devices
        ]
        assert option.code in str(plan)
        data = option.to_dict()
        assert json.loads(json.dumps(data)) == data
        assert data["plan"]["fits"] is True


# --------------------------------------------------------------------------------------------
# Options: pasted into real calls
# --------------------------------------------------------------------------------------------


def test_gpu_refusal_options_each_plan_what_they_say_when_pasted() -> None:
    plan = plan_placement(VL_7B, budgets={0: "10GiB"}, workload=Workload(text_tokens=2048))
    kinds = [option.kind for option in plan.options]
    assert kinds == ["gpus", "quantization", "offload"]
    _assert_each_option_plans_what_it_says(plan)


def test_eager_fp32_refusal_offers_dtype_attention_and_workload() -> None:
    work = Workload(text_tokens=4096)

    def need(dtype: str, attention: str) -> int:
        row = plan_placement(
            VL_7B, budgets={0: "1024GiB"}, dtype=dtype, attn_implementation=attention, workload=work
        ).devices[0]
        return row.total + row.margin

    # A card between what float32 needs with sdpa and with eager: bfloat16 (any attention) and
    # sdpa fit, float32 with eager does not.
    eager, sdpa = need("float32", "eager"), need("float32", "sdpa")
    assert sdpa < eager
    budget = (sdpa + eager) // 2
    plan = plan_placement(
        VL_7B, budgets={0: budget}, dtype="float32", attn_implementation="eager", workload=work
    )
    kinds = [option.kind for option in plan.options]
    assert kinds[:3] == ["dtype", "attention", "workload"]
    _assert_each_option_plans_what_it_says(plan)


def test_cpu_only_refusal_offers_options_and_they_load(tmp_path: Path) -> None:
    path = ot.save_tiny_model("qwen2", tmp_path / "qwen2")
    alone = plan_placement(path, budgets={"cpu": 2**40}).device("cpu")
    # Too small for the whole model in float32, enough for half of it resident.
    cap = alone.total + alone.margin - alone.weights // 2
    plan = plan_placement(path, budgets={"cpu": cap})
    assert not plan.fits
    assert "nothing that omnifix can change" not in plan.explain()
    kinds = {option.kind: option for option in plan.options}
    assert {"dtype", "offload"} <= set(kinds)
    _assert_each_option_plans_what_it_says(plan)
    # Each option's load keywords, pasted into a real load at the same budget.
    for option in (kinds["dtype"], kinds["offload"]):
        call = f"omnifix.load_safely({str(path)!r}, device='cpu', max_memory={{'cpu': {cap}}}, "
        model = _paste(f"{call}{option.load})")
        report = omnifix.placement_report(model)
        assert report.strategy == option.strategy
        inputs = ot.tiny_inputs("qwen2", model.config)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[-1] == inputs["input_ids"].shape[-1] + 2


def test_cpu_only_refusal_without_any_option_says_to_add_memory() -> None:
    plan = plan_placement(VL_7B, budgets={"cpu": "1MiB"})
    assert plan.options == ()
    assert plan.explain().splitlines()[-1].startswith("Fix: give the cpu more memory")


def test_gpus_that_cannot_hold_their_overhead_offer_no_offload_onto_them() -> None:
    budgets = {0: "300MiB", "cpu": "64GiB"}
    plan = plan_placement(VL_7B, budgets=budgets)
    assert "offload" not in {option.kind for option in plan.options}
    assert "copied to cuda:0" not in plan.explain()
    assert [option.kind for option in plan.options] == ["cpu"]
    # With offload allowed the GPU still computes nothing: that is the cpu option, not offload.
    offloading = plan_placement(VL_7B, budgets=budgets, allow_offload=True)
    assert offloading.strategy == "refuse"
    _assert_each_option_plans_what_it_says(plan)


def test_options_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", VL_7B, "--gpu", "10GiB", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    option = next(o for o in data["options"] if o["kind"] == "quantization")
    assert set(option) >= {"kind", "arguments", "code", "load", "plan"}
    # The name, which runs on every stack (int8, or nf4 where int8 is too big).
    assert option["arguments"] in ({"quantization": "'int8'"}, {"quantization": "'nf4'"})
    assert option["load"].startswith("quantization_config=transformers.BitsAndBytesConfig(")
    assert option["plan"]["strategy"] == "single"
    assert option["plan"]["devices"][0]["device"] == "cuda:0"


# --------------------------------------------------------------------------------------------
# Offload: one hooked module at a time
# --------------------------------------------------------------------------------------------


def test_mixtral_8x7b_offloads_to_disk_within_a_12gib_cpu_budget() -> None:
    config = transformers.MixtralConfig()  # the defaults are Mixtral-8x7B's
    plan = plan_placement(config, budgets={"cpu": "12GiB"}, allow_offload=True)
    assert plan.strategy == "offload", plan.explain()
    cpu, disk = plan.device("cpu"), plan.device("disk")
    assert cpu.total + cpu.margin <= 12 * GIB
    assert disk.weights > 150 * GIB  # 46.7 B parameters in float32, nearly all on disk
    # The cpu holds its resident weights and the largest module accelerate copies in at once.
    model = transformers.MixtralForCausalLM
    skeleton = omnifix._plan.skeleton.load_skeleton(config, model_class=model, dtype=plan.dtype)
    largest = skeleton.streamed[0][1]
    assert cpu.activations >= largest
    assert cpu.total - cpu.weights - cpu.kv_cache < largest + GIB
    assert "one module at a time" in plan.reason


def test_offload_to_a_gpu_streams_a_module_not_an_entry() -> None:
    plan = plan_placement(
        VL_7B, budgets={0: "8GiB", "cpu": "64GiB"}, workload=Workload(), allow_offload=True
    )
    assert plan.strategy == "offload"
    gpu = plan.device("cuda:0")
    alone = plan_placement(VL_7B, budgets={0: "80GiB"}).device("cuda:0")
    skeleton = omnifix._plan.skeleton.load_skeleton(VL_7B, model_class=None, dtype=plan.dtype)
    # The GPU's activations grow by the largest module it copies in (lm_head here), far less
    # than the cpu's gigabytes of entries.
    streamed = gpu.activations - alone.activations
    assert 0 < streamed <= skeleton.streamed[0][1] + 2**26
    assert plan.device("cpu").weights > 5 * GIB


# --------------------------------------------------------------------------------------------
# Quantised plans
# --------------------------------------------------------------------------------------------


def test_quantised_plans_keep_lm_head_and_towers_and_shrink_the_rest() -> None:
    bf16 = plan_placement(VL_7B, budgets={0: "80GiB"})
    int8 = plan_placement(VL_7B, budgets={0: "80GiB"}, quantization="int8")
    nf4 = plan_placement(VL_7B, budgets={0: "80GiB"}, quantization="nf4")
    weights = [p.devices[0].weights for p in (bf16, int8, nf4)]
    assert weights[0] > weights[1] > weights[2]
    config = nf4.to_dict()["quantization_config"]  # BitsAndBytesConfig's keywords
    assert config["load_in_4bit"]
    assert config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"]
    assert config["bnb_4bit_compute_dtype"] == "bfloat16"
    assert "lm_head" in config["llm_int8_skip_modules"]
    assert any(skip.endswith("visual") for skip in config["llm_int8_skip_modules"])
    assert any("bitsandbytes nf4" in note for note in nf4.notes)
    # A config as given: transformers' default skips (lm_head) only, so the tower shrinks too.
    given = transformers.BitsAndBytesConfig(load_in_8bit=True)
    plain = plan_placement(VL_7B, budgets={0: "80GiB"}, quantization=given)
    assert plain.devices[0].weights < int8.devices[0].weights


def test_gpt2_conv1d_weights_are_quantised() -> None:
    config = transformers.GPT2Config()
    bf16 = plan_placement(config, budgets={0: "8GiB"}).devices[0].weights
    int8 = plan_placement(config, budgets={0: "8GiB"}, quantization="int8").devices[0].weights
    # The 85 M Conv1D weights go from 2 bytes to 1; embeddings (tied lm_head) stay.
    assert 0.3 * bf16 < bf16 - int8 < 0.6 * bf16


def test_bad_quantisation_arguments() -> None:
    with pytest.raises(omnifix.InvalidArgumentError, match="'int8', 'nf4' or 'fp4'"):
        plan_placement(VL_7B, budgets={0: "8GiB"}, quantization="int3")
    with pytest.raises(omnifix.InvalidArgumentError, match="bitsandbytes weights only"):
        plan_placement(VL_7B, budgets={0: "8GiB"}, quantization=8)
    with pytest.raises(omnifix.InvalidArgumentError, match="allow_offload"):
        plan_placement(VL_7B, budgets={0: "8GiB"}, quantization="nf4", allow_offload=True)


@pytest.mark.skipif(BNB, reason="bitsandbytes is installed")
def test_without_bitsandbytes_loading_quantised_names_what_to_install(tmp_path: Path) -> None:
    path = ot.save_tiny_model("qwen2", tmp_path / "qwen2")
    with pytest.raises(omnifix.QuantizationUnavailableError, match="pip install") as caught:
        omnifix.load_safely(path, device="cpu", quantization="nf4")
    assert isinstance(caught.value, ImportError)
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(omnifix.QuantizationUnavailableError, match="bitsandbytes"):
        omnifix.load_safely(path, device="cpu", quantization_config=config)


@needs_bnb
@pytest.mark.parametrize("quantization", QUANTISATIONS)
@pytest.mark.parametrize("family", ["qwen2", "qwen2-vl", "gpt2"])
def test_quantised_weights_match_real_bitsandbytes_models(
    family: str, quantization: str, tmp_path: Path
) -> None:
    path = (
        save_tiny_gpt2(tmp_path / "gpt2")
        if family == "gpt2"
        else ot.save_tiny_model(family, tmp_path / family)  # type: ignore[arg-type]
    )
    quantised_as = asked(quantization)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = omnifix.load_safely(
            path, device="cpu", dtype=torch.bfloat16, quantization=quantised_as
        )
    plan = plan_placement(
        path, budgets={"cpu": "1GiB"}, dtype=torch.bfloat16, quantization=quantised_as
    )
    linear = type(model.get_submodule(a_quantised_module(model)))
    assert linear.__module__.startswith("bitsandbytes")
    real = model.get_memory_footprint() + quantisation_state(model)
    predicted = plan.device("cpu").weights
    assert abs(predicted - real) <= 0.02 * real, (predicted, real)
    if family == "gpt2":  # bitsandbytes' cpu kernels need 64+ input features (a 4-bit block)
        inputs = {"input_ids": torch.tensor([[1, 2, 3]])}
        with torch.inference_mode():
            assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[-1] == 5


@needs_bnb
def test_the_plan_carries_the_bitsandbytes_config() -> None:
    plan = plan_placement(VL_7B, budgets={0: "80GiB"}, quantization="nf4")
    config = plan.quantization_config
    assert isinstance(config, transformers.BitsAndBytesConfig)
    assert config.to_dict()["bnb_4bit_quant_type"] == "nf4"


@needs_bnb
def test_the_printed_quantisation_option_loads_as_printed(tmp_path: Path) -> None:
    path = ot.save_tiny_model("qwen2-vl", tmp_path / "vl")
    # A budget that only 4-bit weights fit: the option proposes them.
    bf16 = plan_placement(path, budgets={"cpu": "1GiB"}, dtype=torch.bfloat16).device("cpu")
    nf4 = plan_placement(path, budgets={"cpu": "1GiB"}, dtype=torch.bfloat16, quantization="nf4")
    cap = bf16.total + bf16.margin - (bf16.weights - nf4.device("cpu").weights) // 2
    refused = plan_placement(path, budgets={"cpu": cap}, dtype=torch.bfloat16)
    assert not refused.fits
    option: PlanOption = next(o for o in refused.options if o.kind == "quantization")
    assert option.load.startswith("quantization_config=transformers.BitsAndBytesConfig(")
    call = f"omnifix.load_safely({str(path)!r}, device='cpu', dtype=torch.bfloat16, "
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _paste(f"{call}max_memory={{'cpu': {cap}}}, {option.load})")
    quantised = [
        n for n, m in model.named_modules() if n and type(m).__module__.startswith("bitsandbytes")
    ]
    assert quantised
    report = omnifix.placement_report(model)
    assert report.strategy == option.strategy
    assert not any("visual" in name for name in quantised)  # the tower stays in bf16


def test_a_bitsandbytes_checkpoint_plans_quantised_and_others_say_so(tmp_path: Path) -> None:
    path = ot.save_tiny_model("qwen2", tmp_path / "qwen2")
    plain = plan_placement(path, budgets={0: "1GiB"})
    config = json.loads((path / "config.json").read_text())
    stored = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": stored}))
    quantised = plan_placement(path, budgets={0: "1GiB"})
    assert quantised.to_dict()["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert quantised.devices[0].weights < plain.devices[0].weights
    stored = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": stored}))
    gptq = plan_placement(path, budgets={0: "1GiB"})
    assert gptq.quantization is None
    assert not gptq.fits  # not sized: the bound (unquantised weights) only when accepted
    assert gptq.options[0].kind == "bound"
    assert any("quantised with gptq" in note for note in gptq.notes)
    bound = plan_placement(path, budgets={0: "1GiB"}, accept_bound=True)
    assert bound.fits
    assert bound.devices[0].weights == plain.devices[0].weights
