"""Eager attention's cost per score, as the installed code spends it, on the cpu.

The planner asks the model's own ``eager_attention_forward`` what each score costs (it runs the code
on fake tensors). These tests run real tiny models whose scores dominate their memory (long prompts,
narrow layers) and compare the plan with the bytes alive at the peak of a real ``generate``, counted
at every operation. T5 on transformers 5 and GPT-2 keep their softmax in the model's dtype (4 bytes
per bf16 score, not the 10 of Llama-style code); T5 on transformers 5 also adds its position bias
without the batch dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers

from omnifix import Workload, plan_placement
from omnifix._plan.scores import eager_function, live_bytes

if TYPE_CHECKING:
    from pathlib import Path

MIB = 2**20
HEADS = 8
#: Long enough that the scores dominate: batch x heads x 512^2 of them.
WORK = Workload(batch_size=2, text_tokens=512, max_new_tokens=2)
SMALL = {"vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1}
#: family: (model class, config, one self-attention module's name)
MODELS: dict[str, tuple[Any, Any, str]] = {
    "t5": (
        transformers.T5ForConditionalGeneration,
        transformers.T5Config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_heads=HEADS,
            num_layers=2,
            decoder_start_token_id=0,
            **SMALL,
        ),
        "encoder.block.0.layer.0.SelfAttention",
    ),
    "gpt2": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=HEADS, n_positions=1024, **SMALL),
        "transformer.h.0.attn",
    ),
    "qwen2": (
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            **SMALL,
        ),
        "model.layers.0.self_attn",
    ),
}


def _measured(model: Any) -> int:
    """Bytes alive at the peak of a greedy generate of WORK, above what existed before it.

    Under ``no_grad``, not inference mode: there the composite operations (softmax with a dtype)
    reach the counting mode as the kernels they run, temporary copies included.
    """
    ids = torch.randint(2, 64, (WORK.batch_size, WORK.text_tokens))
    with torch.no_grad(), live_bytes([*model.parameters(), *model.buffers()]) as live:
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=WORK.max_new_tokens,
            min_new_tokens=WORK.max_new_tokens,
            do_sample=False,
        )
    peak: int = live.peak
    return peak


@pytest.mark.parametrize("family", sorted(MODELS))
def test_eager_activations_match_a_real_generate(family: str, tmp_path: Path) -> None:
    model_class, config, attention = MODELS[family]
    model_class(config).save_pretrained(tmp_path)
    plan = plan_placement(
        tmp_path,
        budgets={"cpu": "4GiB"},
        dtype=torch.bfloat16,
        attn_implementation="eager",
        workload=WORK,
    )
    row = plan.device("cpu")
    predicted = row.kv_cache + row.activations
    model = model_class.from_pretrained(tmp_path, attn_implementation="eager").to(torch.bfloat16)
    measured = _measured(model.eval())
    assert measured > 4 * WORK.batch_size * HEADS * WORK.text_tokens**2  # the scores dominate
    if eager_function(model.get_submodule(attention)) is None:
        # Code without eager_attention_forward (transformers 4.x layouts) gets the calibrated
        # 10 bytes per score, the most eager code spends: never more than 2 % below.
        assert predicted >= 0.98 * measured, (predicted / MIB, measured / MIB)
        return
    # Within 10 %: a per-score cost off by 2 bytes, or a batch-sized bias, is 20 % or more here.
    assert abs(predicted - measured) <= 0.10 * measured, (predicted / MIB, measured / MIB)


def test_cuda_takes_an_fp16_softmax_into_fp32_without_a_copy(tmp_path: Path) -> None:
    # torch's CUDA softmax reads fp16 and writes fp32 in one kernel; bf16 (and the cpu) copy the
    # scores to fp32 first: 2 bytes more per score at the peak of Llama-style eager attention.
    model_class, config, _ = MODELS["qwen2"]
    model_class(config).save_pretrained(tmp_path)

    def activations(dtype: torch.dtype, device: object) -> int:
        plan = plan_placement(
            tmp_path,
            budgets={device: "8GiB"},
            dtype=dtype,
            attn_implementation="eager",
            workload=WORK,
        )
        return plan.devices[0].activations

    scores = WORK.batch_size * HEADS * WORK.text_tokens**2
    assert activations(torch.bfloat16, 0) - activations(torch.float16, 0) == 2 * scores
    assert activations(torch.bfloat16, "cpu") == activations(torch.float16, "cpu")


def test_a_plan_made_in_inference_mode_counts_what_the_kernels_copy(tmp_path: Path) -> None:
    # Inference mode hands a composite softmax to a dispatch mode whole, its fp32 copy hidden;
    # the probe steps out of it. Twelve heads: a config no other test has probed yet.
    config = transformers.Qwen2Config(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=4,
        **SMALL,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    with torch.inference_mode():
        plans = {
            dtype: plan_placement(
                tmp_path,
                budgets={0: "8GiB"},
                dtype=dtype,
                attn_implementation="eager",
                workload=WORK,
            ).devices[0]
            for dtype in (torch.bfloat16, torch.float16)
        }
    scores = WORK.batch_size * 12 * WORK.text_tokens**2
    assert plans[torch.bfloat16].activations - plans[torch.float16].activations == 2 * scores
