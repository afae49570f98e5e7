"""Built-in full-size presets: the published dimensions of the Qwen multimodal checkpoints.

The placement planner must size a model it cannot download, so omnifix ships the dimensions
of each checkpoint's public ``config.json`` as plain dicts, in the hub's own layout, and lets
the installed transformers parse them with its own config classes (``from_dict``, exactly what
``from_pretrained`` does with the downloaded file). Every version's backward-compatibility code
therefore runs: 4.52+ moves the flat text fields of Qwen2-VL/Qwen2.5-VL into ``text_config``, 5.x
turns ``rope_scaling``/``rope_theta`` into ``rope_parameters``; omnifix never re-implements that.

Where the values come from (no hub access here; found with public code search, and checked by
the parameter counts in ``tests/test_presets.py`` against the hub's safetensors totals):

* ``huggingface.co/<repo>/blob/main/config.json`` of each repository named in :data:`_PRESETS`,
  as quoted verbatim or field by field in public code: copies of the Qwen2.5-VL-7B-Instruct and
  Qwen2.5-VL-3B-Instruct files, a pinned-revision validator of Qwen2.5-Omni-7B's file
  (revision ``ae9e1690543ffd5c0221dc27f79834d0294cba00``), a Rust config loader annotated with the
  Qwen2.5-Omni-3B values, config fixtures of Qwen2-VL-7B-Instruct and Qwen2-Audio-7B-Instruct, and
  ``print(model)`` dumps of Qwen2-VL-7B-Instruct (every linear layer's shape).
* A field the published file leaves out takes the transformers default, as it does when the
  checkpoint is loaded; where that default differs between transformers versions (the
  Qwen2-Audio language model, the Omni text ``tie_word_embeddings``) the value the checkpoint was
  trained with is written out, with a comment.

>>> from omnifix._plan.presets import PRESETS, preset_config
>>> "qwen2.5-omni-7b" in PRESETS
True
>>> preset_config("qwen2-vl-7b").vision_config.depth
32
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from omnifix._compat import quiet
from omnifix.errors import UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["PRESETS", "PresetName", "find_preset", "preset_config", "preset_model_class"]

PresetName = Literal[
    "qwen2-vl-7b",
    "qwen2.5-vl-3b",
    "qwen2.5-vl-7b",
    "qwen2.5-omni-3b",
    "qwen2.5-omni-7b",
    "qwen2-audio-7b",
]

#: Every built-in preset, whether or not the installed transformers can build it.
PRESETS: Final[tuple[PresetName, ...]] = get_args(PresetName)


@dataclass(frozen=True)
class _Preset:
    repo: str  # the Hugging Face repository whose config.json the dims are taken from
    config_class: str  # attribute of ``transformers``
    model_class: str  # attribute of ``transformers``
    min_transformers: str  # first release that ships both classes
    config: Mapping[str, Any]  # config.json, in the hub's layout


# --- Qwen2-VL -------------------------------------------------------------------------------------

# Qwen/Qwen2-VL-7B-Instruct config.json: the fields a public config fixture of that file quotes,
# and the vision tower as public print(model) dumps of the checkpoint show it: patch embed
# Conv3d(3, 1280, (2, 14, 14)), 32 blocks of width 1280 (qkv 1280->3840, fc1 1280->5120, i.e.
# mlp_ratio 4), merger 5120 -> 5120 -> 3584; embed_tokens (152064, 3584) and a separate lm_head.
# Everything else (activation, sliding-window fields) is the transformers default, as on load.
_QWEN2_VL_7B: Final[dict[str, Any]] = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "hidden_size": 3584,  # output width of the patch merger = the language model's width
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}

# --- Qwen2.5-VL -----------------------------------------------------------------------------------


def _qwen2_5_vl(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_window_layers: int,
    vocab_size: int,
    tie_word_embeddings: bool,
) -> dict[str, Any]:
    """Qwen/Qwen2.5-VL-{3B,7B}-Instruct config.json: same vision tower, different language model.

    Both files are quoted verbatim in public code. They spell the vision ``in_channels`` as
    ``"in_chans"``, which transformers ignores (its default is the same 3); the key transformers
    reads is written here instead.
    """
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 128000,
        "max_window_layers": max_window_layers,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tie_word_embeddings,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_channels": 3,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }


_QWEN2_5_VL_3B: Final = _qwen2_5_vl(
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_window_layers=70,
    vocab_size=151936,
    tie_word_embeddings=True,
)
_QWEN2_5_VL_7B: Final = _qwen2_5_vl(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_window_layers=28,
    vocab_size=152064,
    tie_word_embeddings=False,
)

# --- Qwen2.5-Omni ---------------------------------------------------------------------------------


def _qwen2_5_omni(
    *,
    text: Mapping[str, Any],
    talker: Mapping[str, Any],
) -> dict[str, Any]:
    """Qwen/Qwen2.5-Omni-{3B,7B} config.json: thinker (text, vision, audio), talker, token2wav.

    Audio and vision towers and token2wav are the same in both sizes; only their output width
    follows the thinker's language model.
    """
    width = text["hidden_size"]
    return {
        "architectures": ["Qwen2_5OmniModel"],
        "model_type": "qwen2_5_omni",
        "enable_audio_output": True,
        "enable_talker": True,
        "thinker_config": {
            "model_type": "qwen2_5_omni_thinker",
            # The Qwen2 tokenizer's vision markers; the thinker's rope index reads them and
            # transformers 5.x has no default for them, so a config without them cannot generate.
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "text_config": {
                **text,
                "hidden_act": "silu",
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-06,
                "rope_theta": 1000000.0,
                # The thinker has its own lm_head; transformers 5.x defaults this to True (4.x to
                # False), so it is written out.
                "tie_word_embeddings": False,
                # rope_scaling (mrope_section [16, 24, 24]) is left to the transformers default,
                # which is that value: passed explicitly, 4.5x logs a spurious validation warning.
            },
            # The Qwen2.5-VL vision tower (the technical report: 675M parameters).
            "vision_config": {
                "depth": 32,
                "hidden_act": "silu",
                "hidden_size": 1280,  # transformers' default (3584) is not the checkpoint's
                "intermediate_size": 3420,
                "num_heads": 16,
                "in_channels": 3,
                "out_hidden_size": width,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
            "audio_config": {
                "d_model": 1280,
                "encoder_layers": 32,
                "encoder_attention_heads": 20,
                "encoder_ffn_dim": 5120,
                "num_mel_bins": 128,
                "max_source_positions": 1500,
                "output_dim": width,
            },
        },
        "talker_config": {
            **talker,
            "embedding_size": width,  # the talker reads the thinker's hidden states
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "vocab_size": 8448,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        # The file names the DiT fields "dim", "depth" and "heads", which transformers ignores
        # (its defaults are these same values); omnifix writes the names transformers reads.
        # BigVGAN's kernel and dilation lists are not in the sources found; both sizes rely on the
        # transformers defaults for them, which match the checkpoint's tensor shapes.
        "token2wav_config": {
            "dit_config": {
                "hidden_size": 1024,
                "num_hidden_layers": 22,
                "num_attention_heads": 16,
                "head_dim": 64,
                "ff_mult": 2,
                "emb_dim": 512,
                "mel_dim": 80,
                "num_embeds": 8193,
            },
            "bigvgan_config": {
                "mel_dim": 80,
                "upsample_initial_channel": 1536,
                "upsample_rates": [5, 3, 2, 2, 2, 2],
                "resblock_kernel_sizes": [3, 7, 11],
            },
        },
    }


_QWEN2_5_OMNI_3B: Final = _qwen2_5_omni(
    text={
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    # The Qwen2.5-0.5B shape: 14 heads of 64.
    talker={
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
)
_QWEN2_5_OMNI_7B: Final = _qwen2_5_omni(
    text={
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
    },
    talker={
        "intermediate_size": 18944,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 128,
    },
)

# --- Qwen2-Audio ----------------------------------------------------------------------------------

# Qwen/Qwen2-Audio-7B-Instruct config.json. Its text_config omits the language model's geometry,
# so the checkpoint relies on the Qwen2Config defaults (hidden 4096, 32 layers, 32 heads, 32 kv
# heads, untied). They are written out so a future change of those defaults cannot resize it.
_QWEN2_AUDIO_7B: Final[dict[str, Any]] = {
    "architectures": ["Qwen2AudioForConditionalGeneration"],
    "model_type": "qwen2_audio",
    "audio_token_index": 151646,
    "vocab_size": 156032,
    "audio_config": {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 128,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "d_model": 1280,
        "activation_function": "gelu",
        "scale_embedding": False,
        "max_source_positions": 1500,
    },
    "text_config": {
        "model_type": "qwen2",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "intermediate_size": 11008,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000,
        "sliding_window": 32768,
        "vocab_size": 156032,
        # Qwen2Config defaults the checkpoint relies on:
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
    },
}

_PRESETS: Final[dict[PresetName, _Preset]] = {
    "qwen2-vl-7b": _Preset(
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen2VLConfig",
        "Qwen2VLForConditionalGeneration",
        "4.45",
        _QWEN2_VL_7B,
    ),
    "qwen2.5-vl-3b": _Preset(
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLForConditionalGeneration",
        "4.49",
        _QWEN2_5_VL_3B,
    ),
    "qwen2.5-vl-7b": _Preset(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLForConditionalGeneration",
        "4.49",
        _QWEN2_5_VL_7B,
    ),
    "qwen2.5-omni-3b": _Preset(
        "Qwen/Qwen2.5-Omni-3B",
        "Qwen2_5OmniConfig",
        "Qwen2_5OmniForConditionalGeneration",
        "4.52",
        _QWEN2_5_OMNI_3B,
    ),
    "qwen2.5-omni-7b": _Preset(
        "Qwen/Qwen2.5-Omni-7B",
        "Qwen2_5OmniConfig",
        "Qwen2_5OmniForConditionalGeneration",
        "4.52",
        _QWEN2_5_OMNI_7B,
    ),
    "qwen2-audio-7b": _Preset(
        "Qwen/Qwen2-Audio-7B-Instruct",
        "Qwen2AudioConfig",
        "Qwen2AudioForConditionalGeneration",
        "4.45",
        _QWEN2_AUDIO_7B,
    ),
}


def _normalise(name: str) -> str:
    """``"Qwen/Qwen2.5-Omni-7B"`` -> ``"qwen2.5-omni-7b"``; the instruct suffix is dropped too."""
    key = name.strip().lower()
    key = key.removeprefix("qwen/")
    return key.removesuffix("-instruct")


def find_preset(name: str, *, required: bool = True) -> PresetName | None:
    """The preset ``name`` means (case and the hub's ``Qwen/`` and ``-Instruct`` ignored).

    Raises:
        UnsupportedModelError: ``required`` and ``name`` is no preset; the message lists the
            presets and suggests the closest.

    Example:
        >>> from omnifix._plan.presets import find_preset
        >>> find_preset("Qwen/Qwen2.5-Omni-7B"), find_preset("org/model", required=False)
        ('qwen2.5-omni-7b', None)
    """
    key = _normalise(name)
    if key in _PRESETS:
        return key
    if not required:
        return None
    known = ", ".join(repr(p) for p in PRESETS)
    close = difflib.get_close_matches(key, PRESETS, n=1, cutoff=0.5)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise UnsupportedModelError(
        f"No built-in preset named {name!r}; the presets are {known}. {hint}"
        "Pass one of those names (case does not matter; the hub repository id works too)."
    )


def _lookup(name: str) -> tuple[PresetName, _Preset]:
    preset_name = find_preset(name)
    assert preset_name is not None  # noqa: S101 - required=True raises instead
    return preset_name, _PRESETS[preset_name]


def _class(preset_name: PresetName, preset: _Preset, attribute: str) -> Any:
    import transformers

    cls = getattr(transformers, attribute, None)
    if cls is None:
        needed = preset.min_transformers
        raise UnsupportedModelError(
            f"Preset {preset_name!r} ({preset.repo}) needs transformers>={needed}, but "
            f"transformers {transformers.__version__} is installed and has no {attribute}. "
            f"Upgrade it: pip install 'transformers>={needed}'"
        )
    return cls


def preset_config(name: str) -> PretrainedConfig:
    """The config of a built-in preset, built by the installed transformers' own config class.

    Args:
        name: One of :data:`PRESETS`, case-insensitive; the hub repository id (e.g.
            ``"Qwen/Qwen2.5-Omni-7B"``, with or without ``-Instruct``) is accepted too.

    Returns:
        A fresh config (safe to modify) with the checkpoint's published dimensions.

    Raises:
        UnsupportedModelError: ``name`` is not a preset (the message suggests the closest one),
            or the installed transformers predates the model family.

    Example:
        >>> from omnifix._plan.presets import preset_config
        >>> config = preset_config("Qwen/Qwen2-Audio-7B-Instruct")
        >>> config.text_config.hidden_size, config.audio_config.encoder_layers
        (4096, 32)
    """
    preset_name, preset = _lookup(name)
    config_class = _class(preset_name, preset, preset.config_class)
    # from_dict is what from_pretrained does with the downloaded config.json, so each version's
    # own layout conversion applies. Config classes mutate nested dicts (rope_scaling): deepcopy.
    with quiet():
        config: PretrainedConfig = config_class.from_dict(copy.deepcopy(dict(preset.config)))
    return config


def preset_model_class(name: str) -> type[PreTrainedModel]:
    """The transformers class that loads the preset's checkpoint (the class of the full model).

    Args:
        name: As for :func:`preset_config`.

    Returns:
        For example ``Qwen2_5OmniForConditionalGeneration`` for ``"qwen2.5-omni-7b"``.

    Raises:
        UnsupportedModelError: As for :func:`preset_config`.

    Example:
        >>> from omnifix._plan.presets import preset_model_class
        >>> preset_model_class("qwen2-vl-7b").__name__
        'Qwen2VLForConditionalGeneration'
    """
    preset_name, preset = _lookup(name)
    model_class: type[PreTrainedModel] = _class(preset_name, preset, preset.model_class)
    return model_class
