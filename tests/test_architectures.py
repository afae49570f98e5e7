"""The planner on the architectures people run now, each a meta skeleton of its published config.

The expected numbers are published facts or arithmetic on published config fields, never outputs
of omnifix: parameter counts from the hub's safetensors metadata (the presets' README), KV cache
bytes as ``layers x 2 (K and V) x kv_heads x head_dim x 2 bytes (bf16) x tokens`` with each
layer's span (a sliding window keeps its last ``sliding_window`` tokens where the installed
``generate`` cache does so; cross-attention keeps the encoder's or the images' positions).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import transformers
from packaging.version import Version

import omnifix
from omnifix import Workload, plan_placement
from omnifix._plan.anatomy import describe
from omnifix._plan.presets import preset_config
from omnifix._plan.quantization import quantize, resolve_quantization
from omnifix._plan.skeleton import build_on_meta, build_skeleton, load_skeleton

INSTALLED = Version(Version(transformers.__version__).base_version)
#: Sliding-window layers keep only their window from this release on (per-layer cache classes).
WINDOWED_CACHE = Version("4.56") <= INSTALLED
GIB = 2**30
TOKENS = 32768
NEW = 256
BF16 = 2


def kv_per_token(kv_heads: int, head_dim: int) -> int:
    """One layer's K and V per token, bf16."""
    return 2 * kv_heads * head_dim * BF16


# preset: (published parameters or None, first transformers release, text layers, kv_heads,
#          head_dim, towers by kind)
ARCHITECTURES: dict[str, tuple[int | None, str, int, int, int, tuple[str, ...]]] = {
    "llama-3.1-8b": (8_030_261_248, "4.45", 32, 8, 128, ()),
    "gemma-3-1b": (999_885_952, "4.50", 26, 1, 256, ()),
    "gemma-3-4b": (4_300_079_472, "4.50", 34, 4, 256, ("vision",)),
    "mistral-7b-v0.1": (7_241_732_096, "4.45", 32, 8, 128, ()),
    "qwen3-8b": (8_190_735_360, "4.51", 36, 8, 128, ()),
    "qwen3-30b-a3b": (30_532_122_624, "4.51", 48, 4, 128, ()),
    "qwen3-vl-8b": (8_767_123_696, "4.57", 36, 8, 128, ("vision",)),
    "qwen3-omni-30b-a3b-thinker": (None, "4.57", 48, 4, 128, ("audio", "vision")),
    "llama-3.2-11b-vision": (10_670_220_835, "4.45", 40, 8, 128, ("vision",)),
    "whisper-large-v3": (1_543_490_560, "4.45", 32, 20, 64, ("audio",)),
    "flan-t5-large": (783_150_080, "4.45", 24, 16, 64, ()),
    "gpt2": (124_439_808, "4.45", 12, 12, 64, ()),
}


def case(name: str, *values: object) -> Any:
    """``(name, *values)`` as one parameter set, skipped where transformers predates ``name``."""
    first = ARCHITECTURES[name][1]
    reason = f"{name} needs transformers>={first} (transformers {transformers.__version__} is in)"
    return pytest.param(
        name, *values, marks=pytest.mark.skipif(Version(first) > INSTALLED, reason=reason)
    )


def available(*names: str) -> list[Any]:
    """``names`` as parameters, each skipped where the installed transformers predates it."""
    return [case(name) for name in names]


@cache
def skeleton(name: str) -> Any:
    return build_skeleton(name)


def plan(name: str, work: Workload, budget: str = "140GiB") -> omnifix.PlacementPlan:
    return plan_placement(name, budgets={0: budget}, workload=work, attn_implementation="sdpa")


@pytest.mark.parametrize("name", available(*ARCHITECTURES))
def test_weights_within_a_thousandth_of_the_published_count(name: str) -> None:
    published = ARCHITECTURES[name][0]
    if published is None:
        pytest.skip(f"no published parameter count of {name} at hand")
    if name == "flan-t5-large" and Version("5.0") <= INSTALLED:
        published -= 32128 * 1024  # transformers 5 ties T5's lm_head whatever the config says
    assert abs(skeleton(name).num_parameters() - published) <= 0.001 * published


@pytest.mark.parametrize("name", available(*ARCHITECTURES))
def test_language_model_kv_cache_and_towers_are_recognised(name: str) -> None:
    _, _, layers, _, _, towers = ARCHITECTURES[name]
    anatomy = describe(skeleton(name))
    assert anatomy.text is not None
    assert len(anatomy.text.layers) == layers
    assert anatomy.lm_head is not None
    assert sorted(tower.kind for tower in anatomy.towers) == sorted(towers)
    assert anatomy.unknown == ()
    work = Workload(text_tokens=2048, max_new_tokens=NEW)
    if "audio" in towers:
        work = Workload(text_tokens=64, audio_seconds=30, max_new_tokens=NEW)
    result = plan(name, work)
    (row,) = result.devices
    assert result.fits
    assert row.kv_cache > 0
    assert row.activations > 0
    assert not [note for note in result.notes if note.startswith("not understood")]


@pytest.mark.parametrize(
    "name", available("llama-3.1-8b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-vl-8b", "gpt2")
)
def test_global_attention_keeps_every_token_of_every_layer(name: str) -> None:
    _, _, layers, kv_heads, head_dim, _ = ARCHITECTURES[name]
    tokens = 1000 if name == "gpt2" else TOKENS
    (row,) = plan(name, Workload(text_tokens=tokens, max_new_tokens=NEW)).devices
    assert row.kv_cache == layers * kv_per_token(kv_heads, head_dim) * (tokens + NEW)


@pytest.mark.parametrize(
    ("name", "window", "full_layers"),
    [
        # Gemma 3: a global layer after every 5 sliding ones (layers 5, 11, 17, ...).
        case("gemma-3-1b", 512, 4),
        case("gemma-3-4b", 1024, 5),
        # Mistral 7B v0.1: sliding_window on every layer.
        case("mistral-7b-v0.1", 4096, 0),
    ],
)
def test_sliding_window_layers_keep_their_window(name: str, window: int, full_layers: int) -> None:
    _, _, layers, kv_heads, head_dim, _ = ARCHITECTURES[name]
    per_token = kv_per_token(kv_heads, head_dim)
    (row,) = plan(name, Workload(text_tokens=TOKENS, max_new_tokens=NEW)).devices
    total = TOKENS + NEW
    if not WINDOWED_CACHE:  # this release's cache keeps every token
        assert row.kv_cache == layers * per_token * total
        return
    expected = per_token * (full_layers * total + (layers - full_layers) * window)
    assert row.kv_cache == expected


@pytest.mark.parametrize("name", available("llama-3.2-11b-vision"))
def test_mllama_keeps_self_kv_in_32_layers_and_image_kv_in_its_8_cross_layers(name: str) -> None:
    per_token = kv_per_token(8, 128)
    images = 4 * 1601  # one 560 px image in 4 tiles of (560 / 14)^2 + 1 patches
    work = Workload(text_tokens=TOKENS, image_tokens=images, max_new_tokens=NEW)
    (row,) = plan(name, work).devices
    assert row.kv_cache == per_token * (32 * (TOKENS + NEW) + 8 * images)


@pytest.mark.parametrize("name", available("llama-3.2-11b-vision"))
def test_mllama_text_stack_costs_what_llama_3_1_8b_costs(name: str) -> None:
    # The same 32 self-attention layers as Llama-3.1-8B: no "fits" that forgets them.
    work = Workload(text_tokens=TOKENS, max_new_tokens=NEW)
    mllama = plan(name, work, "24GiB")
    llama = plan("llama-3.1-8b", work)
    assert not mllama.fits
    assert mllama.devices[0].kv_cache == llama.devices[0].kv_cache
    assert mllama.devices[0].activations >= llama.devices[0].activations


@pytest.mark.parametrize("name", available("whisper-large-v3"))
def test_whisper_decoder_keeps_self_and_cross_kv_and_the_encoder_none(name: str) -> None:
    per_token = kv_per_token(20, 64)
    batch, prompt = 4, 4
    work = Workload(batch_size=batch, text_tokens=prompt, audio_seconds=30, max_new_tokens=440)
    (row,) = plan(name, work).devices
    # 32 decoder layers: the prompt and the reply, and the encoder's 1500 positions of 30 s.
    assert row.kv_cache == batch * 32 * per_token * (prompt + 440 + 1500)


@pytest.mark.parametrize("name", available("flan-t5-large"))
def test_t5_encoder_keeps_no_kv_and_the_decoder_attends_to_the_prompt(name: str) -> None:
    per_token = kv_per_token(16, 64)
    work = Workload(text_tokens=2048, max_new_tokens=NEW)
    (row,) = plan(name, work).devices
    # 24 decoder layers: its own start token and reply, and the encoder's 2048 positions.
    assert row.kv_cache == 24 * per_token * (1 + NEW + 2048)


@pytest.mark.parametrize("name", available("qwen3-30b-a3b", "qwen3-omni-30b-a3b-thinker"))
def test_moe_dispatch_is_counted_above_a_dense_mlp_of_the_same_width(name: str) -> None:
    anatomy = describe(skeleton(name))
    assert anatomy.text is not None
    experts = anatomy.text.experts
    assert experts is not None
    assert (experts.count, experts.top_k, experts.inner) == (128, 8, 768)
    assert all(anatomy.text.sparse)
    (row,) = plan(name, Workload(text_tokens=8192, max_new_tokens=NEW)).devices
    if experts.fused:  # grouped kernels: each token's hidden state gathered for its 8 experts
        assert row.activations > 8192 * 8 * 2048 * BF16
    else:  # a loop over expert modules, after an int64 one-hot mask of every token's choices
        assert row.activations > 8192 * 8 * 128 * 8


@pytest.mark.parametrize("name", available("qwen3-vl-8b"))
def test_qwen3_vl_deepstack_features_are_kept_for_the_prefill(name: str) -> None:
    (tower,) = describe(skeleton(name)).towers
    assert tower.kept_features == 3  # deepstack_visual_indexes [8, 16, 24]
    assert tower.patches_per_token == 4  # spatial_merge_size 2


@pytest.mark.parametrize("name", available("gpt2"))
def test_gpt2_conv1d_weights_shrink_in_the_8_bit_estimate(name: str) -> None:
    import torch

    full = load_skeleton(name, model_class=None, dtype=torch.bfloat16)
    quantization = resolve_quantization("int8", full)
    assert quantization is not None
    quantised = quantize(full, quantization)
    block = "transformer.h.0"
    # Every Conv1D weight becomes one byte per value: the block shrinks to about half.
    assert quantised.sizes[block] < 0.6 * full.sizes[block]


def test_a_layer_kind_the_model_does_not_size_is_refused_unless_the_bound_is_accepted(
    linear_attention_config: Any,
) -> None:
    import torch

    config = linear_attention_config
    refused = plan_placement(config, budgets={0: "8GiB"})
    assert not refused.fits
    [bound] = refused.options
    assert (bound.kind, dict(bound.arguments)) == ("bound", {"accept_bound": "True"})
    scope = {"omnifix": omnifix, "torch": torch, "config": config}
    assert eval(bound.code, scope).fits  # noqa: S307 - the code omnifix printed
    assert any("linear_attention" in note for note in refused.notes)
    with pytest.raises(omnifix.InsufficientMemoryError, match="accept_bound=True"):
        refused.raise_if_refused()
    accepted = plan_placement(config, budgets={0: "8GiB"}, accept_bound=True)
    assert accepted.fits
    assert accepted.devices[0].kv_cache > 0


def test_presets_read_their_published_configs() -> None:
    config = preset_config("gpt2")
    assert (config.n_layer, config.n_embd, config.vocab_size) == (12, 768, 50257)


def _cache_bytes(cache: Any) -> int:
    """Bytes of the distinct storages a real cache holds (a sliced view keeps its whole base)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    elif isinstance(cache, tuple):  # 4.4x's legacy format: a (keys, values) pair per layer
        tensors = [t for pair in cache for t in pair]
    else:  # releases before per-layer cache classes
        tensors = [*cache.key_cache, *cache.value_cache]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _tiny_sliding_configs() -> list[Any]:
    sizes: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 128,
        "sliding_window": 8,
    }
    configs = [pytest.param("MistralConfig", sizes, id="mistral")]
    gemma = {**sizes, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}
    configs.append(
        pytest.param(
            "Gemma3TextConfig",
            gemma,
            id="gemma3",
            marks=pytest.mark.skipif(
                not hasattr(transformers, "Gemma3TextConfig"), reason="no Gemma 3 here"
            ),
        )
    )
    return configs


@pytest.mark.parametrize(("config_name", "sizes"), _tiny_sliding_configs())
def test_kv_cache_after_the_prefill_and_a_step_is_what_a_real_cache_holds(
    config_name: str, sizes: Any
) -> None:
    # transformers' sliding-window cache layers keep a view of the whole prompt's keys and values
    # until the first decode step replaces it with the window: at the end of the prefill every
    # layer holds the prompt, after a step a sliding layer its window. Measured on a real forward.
    import torch

    from omnifix._plan.estimate import estimate

    config = getattr(transformers, config_name)(**sizes)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()  # float32
    prompt, batch = 40, 2
    ids = torch.randint(0, 128, (batch, prompt))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        after_prefill = _cache_bytes(out.past_key_values)
        step = model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
        after_step = _cache_bytes(step.past_key_values)

    meta = build_on_meta(config, type(model), torch.float32)
    work = Workload(batch_size=batch, text_tokens=prompt, max_new_tokens=1)
    usage = estimate(
        describe(meta),
        execution_device=lambda _: "cpu",
        load=work,
        dtype=torch.float32,
        attn_implementation="sdpa",
    )["cpu"]
    assert (usage.prefill_kv, usage.kv_cache) == (after_prefill, after_step)
