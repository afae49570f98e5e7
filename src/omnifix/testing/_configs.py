"""Tiny configs for each Qwen family, written in the layout of the installed transformers.

The config classes changed shape twice: 4.52 split Qwen2-VL/Qwen2.5-VL into ``text_config`` and
``vision_config`` (before, the text fields sat at the top level), and 5.0 renamed ``rope_scaling``
to ``rope_parameters`` (with ``rope_theta`` inside) and made every config a strict dataclass. Each
config is built by the family's own config class, so every version's own validation runs.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeAlias, get_args

from omnifix._compat import (
    QWEN2_5_OMNI,
    QWEN2_5_VL,
    ROPE_PARAMETERS,
    transformers_at_least,
    transformers_version,
)
from omnifix.errors import UnsupportedModelError

if TYPE_CHECKING:
    from packaging.version import Version
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "FAMILIES",
    "Family",
    "available_families",
    "check_family",
    "model_class",
    "speakers",
    "tiny_config",
]

Family: TypeAlias = Literal[
    "qwen2", "qwen2-vl", "qwen2.5-vl", "qwen2-audio", "qwen2.5-omni-thinker", "qwen2.5-omni"
]
#: Every family, in the order of :data:`Family`.
FAMILIES: Final[tuple[Family, ...]] = get_args(Family)


class Tokens:
    """Token ids of the tiny vocabulary: text below 240, special tokens from 240 up."""

    VOCAB: Final = 256
    END_OF_TEXT: Final = 240  # bos and pad, as <|endoftext|> in the real tokenizer
    IM_START: Final = 241
    IM_END: Final = 242  # eos
    AUDIO_START: Final = 243
    AUDIO_END: Final = 244
    AUDIO: Final = 245
    VISION_START: Final = 246
    VISION_END: Final = 247
    IMAGE: Final = 248
    VIDEO: Final = 249
    TTS_TEXT_START: Final = 250
    TTS_TEXT_END: Final = 251
    TTS_TEXT_PAD: Final = 252
    SPEAKER_BOS: Final = (253, 254)  # one talker bos token per speaker
    USER: Final = 255
    # The talker's codec vocabulary is its own, but as large as the text one: the talker's config
    # also holds text-vocabulary ids (tts_text_*, vision_start, ...), and 5.x checks every
    # ``*_token_id`` against ``vocab_size`` (the real talker, 8448 codes, fails that check).
    CODEC_VOCAB: Final = 256
    CODEC_PAD: Final = 232
    CODEC_START: Final = 233
    CODEC_END: Final = 234
    CODEC_MASK: Final = 235


# Language models: 4 layers (so tests can split them over several devices), head_dim 16, GQA.
_HIDDEN: Final = 32
_HEAD_DIM: Final = 16
_ROPE_THETA: Final = 1_000_000.0
# Vision towers keep the real patch geometry, so pixel_values have the real processors' shape.
_PATCH: Final = 14
_MERGE: Final = 2
#: Mel dimension of token2wav (DiT output, BigVGAN input, reference mel of each speaker).
_MEL_DIM: Final = 8
_SPEAKER_EMBEDDING: Final = 16


class _Spec(NamedTuple):
    name: str  # as messages call the family
    model_class: str
    since: Version | None = None  # the first transformers that ships it (None: every one)


_SPECS: Final[dict[Family, _Spec]] = {
    "qwen2": _Spec("Qwen2", "Qwen2ForCausalLM"),
    "qwen2-vl": _Spec("Qwen2-VL", "Qwen2VLForConditionalGeneration"),
    "qwen2.5-vl": _Spec("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", QWEN2_5_VL),
    "qwen2-audio": _Spec("Qwen2-Audio", "Qwen2AudioForConditionalGeneration"),
    "qwen2.5-omni-thinker": _Spec(
        "Qwen2.5-Omni (thinker)", "Qwen2_5OmniThinkerForConditionalGeneration", QWEN2_5_OMNI
    ),
    "qwen2.5-omni": _Spec("Qwen2.5-Omni", "Qwen2_5OmniForConditionalGeneration", QWEN2_5_OMNI),
}


def available_families() -> tuple[Family, ...]:
    """The families the installed transformers supports, in :data:`FAMILIES` order.

    Returns:
        A sub-tuple of :data:`FAMILIES` (Qwen2.5-VL needs transformers 4.49, Qwen2.5-Omni 4.52).

    Example:
        >>> import omnifix.testing as ot
        >>> {"qwen2", "qwen2-vl", "qwen2-audio"} <= set(ot.available_families())
        True
    """
    return tuple(
        family
        for family, spec in _SPECS.items()
        if spec.since is None or transformers_at_least(spec.since)
    )


def check_family(family: str) -> Family:
    """``family`` itself, once known and supported here; else the error that says what to do."""
    if family not in FAMILIES:
        known = ", ".join(repr(f) for f in FAMILIES)
        raise UnsupportedModelError(
            f"Unknown model family {family!r}: omnifix.testing has no builder for it. "
            f"Pass one of {known} (omnifix.testing.available_families() lists the ones your "
            "transformers supports)."
        )
    # From here on, mypy knows ``family`` is a Family (the membership test narrows it).
    if family not in available_families():
        spec = _SPECS[family]
        raise UnsupportedModelError(
            f"{spec.name} ({family!r}) needs transformers>={spec.since}, but "
            f"transformers {transformers_version()} is installed. "
            f"Upgrade it: pip install 'transformers>={spec.since}'"
        )
    return family


def model_class(family: Family) -> type[PreTrainedModel]:
    """The transformers model class of ``family``.

    Args:
        family: One of :data:`FAMILIES`.

    Returns:
        The class docs/testing.md lists for ``family``; ``tiny_model`` instantiates it, and its
        ``from_pretrained`` loads the directory ``save_tiny_model`` writes.

    Raises:
        UnsupportedModelError: ``family`` is unknown, or the installed transformers predates it.

    Example:
        >>> import omnifix.testing as ot
        >>> ot.model_class("qwen2-vl").__name__
        'Qwen2VLForConditionalGeneration'
    """
    import transformers

    cls: type[PreTrainedModel] = getattr(transformers, _SPECS[check_family(family)].model_class)
    return cls


def tiny_config(family: Family) -> PretrainedConfig:
    """A fresh tiny config of ``family``, in the layout of the installed transformers.

    Args:
        family: One of :data:`FAMILIES`.

    Returns:
        A new config on every call; change it freely before building a model from it.

    Raises:
        UnsupportedModelError: ``family`` is unknown, or the installed transformers predates it.

    Example:
        >>> import omnifix.testing as ot
        >>> config = ot.tiny_config("qwen2")
        >>> config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings
        (4, 32, False)
    """
    checked = check_family(family)
    config_class: Any = model_class(checked).config_class  # 4.x ships it unannotated
    # The family's own class validates the fields the way the installed version does.
    config: PretrainedConfig = config_class(**_fields(checked))
    return config


# --- the pieces every family is made of -----------------------------------------------------------


def _rope(*, mrope: bool) -> dict[str, Any]:
    """Rotary settings, as ``rope_scaling`` + ``rope_theta`` (4.x) or ``rope_parameters`` (5.x)."""
    # (2, 3, 3) sums to head_dim / 2, as Qwen's (16, 24, 24) does for 128.
    section = {"mrope_section": [2, 3, 3]} if mrope else {}
    if transformers_at_least(ROPE_PARAMETERS):
        return {"rope_parameters": {"rope_type": "default", "rope_theta": _ROPE_THETA, **section}}
    if not mrope:
        return {"rope_theta": _ROPE_THETA}
    # 4.x converts "mrope" to "default" itself; Omni's text config expects "default" directly.
    scaling = {"type": "default", "rope_type": "default", **section}
    return {"rope_theta": _ROPE_THETA, "rope_scaling": scaling}


def _text(*, mrope: bool, vocab_size: int = Tokens.VOCAB) -> dict[str, Any]:
    """A 4-layer Qwen2-style decoder (the language model of every family)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": _HIDDEN,
        "intermediate_size": 2 * _HIDDEN,
        "num_hidden_layers": 4,
        "num_attention_heads": _HIDDEN // _HEAD_DIM,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": Tokens.END_OF_TEXT,
        "eos_token_id": Tokens.IM_END,
        "pad_token_id": Tokens.END_OF_TEXT,
        **_rope(mrope=mrope),
    }


def _vision(**fields: Any) -> dict[str, Any]:
    """A 2-block vision tower of width 32 with the real patch geometry, plus ``fields``."""
    return {
        "depth": 2,
        "hidden_size": _HIDDEN,  # output of the patch merger = the language model's width
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": _PATCH,
        "spatial_merge_size": _MERGE,
        "temporal_patch_size": 2,
        **fields,
    }


def _windowed_vision(**fields: Any) -> dict[str, Any]:
    """Qwen2.5-VL / Qwen2.5-Omni vision tower: window attention, last block full attention."""
    return _vision(
        intermediate_size=2 * _HIDDEN,
        window_size=_PATCH * _MERGE * 4,  # 112 as in the real models: 4x4 merged patches
        out_hidden_size=_HIDDEN,
        fullatt_block_indexes=[1],
        **fields,
    )


def _audio_encoder(**fields: Any) -> dict[str, Any]:
    """Whisper-style audio tower shared by Qwen2-Audio and Qwen2.5-Omni, plus ``fields``."""
    return {
        "num_mel_bins": 128,  # as the real towers
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 2 * _HIDDEN,
        "d_model": _HIDDEN,
        # Qwen2-Audio wants exactly 2 * max_source_positions mel frames: 32 here, 8 audio tokens.
        "max_source_positions": 16,
        **fields,
    }


def _omni_shared() -> dict[str, Any]:
    """What the configs of Omni's thinker and talker both hold: media token ids, audio timing."""
    return {
        "audio_token_index": Tokens.AUDIO,
        "image_token_index": Tokens.IMAGE,
        "video_token_index": Tokens.VIDEO,
        "audio_start_token_id": Tokens.AUDIO_START,
        "audio_end_token_id": Tokens.AUDIO_END,
        "vision_start_token_id": Tokens.VISION_START,
        "vision_end_token_id": Tokens.VISION_END,
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
    }


# --- the fields of each family's config class -----------------------------------------------------


def _fields(family: Family) -> dict[str, Any]:
    """The keyword arguments of ``family``'s config class, in the installed layout."""
    if family == "qwen2":
        return _text(mrope=False)
    if family == "qwen2-vl":
        return _vl(family, _vision(embed_dim=_HIDDEN, mlp_ratio=2))
    if family == "qwen2.5-vl":
        return _vl(family, _windowed_vision(tokens_per_second=2))
    if family == "qwen2-audio":
        return {
            "audio_config": _audio_encoder(),
            "text_config": _text(mrope=False),
            "audio_token_index": Tokens.AUDIO,
            # 4.x: the composite config's own flag defaults to True (5.x has no such field).
            "tie_word_embeddings": False,
        }
    if family == "qwen2.5-omni-thinker":
        return _thinker_fields()
    return {  # qwen2.5-omni: the thinker, the talker and token2wav
        "thinker_config": _thinker_fields(),
        "talker_config": _talker_fields(),
        "token2wav_config": _token2wav_fields(),
        "enable_audio_output": True,
    }


def _vl(family: Family, vision: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "vision_config": vision,
        "image_token_id": Tokens.IMAGE,
        "video_token_id": Tokens.VIDEO,
        "vision_start_token_id": Tokens.VISION_START,
        "vision_end_token_id": Tokens.VISION_END,
    }
    config_class: Any = model_class(family).config_class
    if "text_config" in inspect.signature(config_class.__init__).parameters:  # 4.52+
        fields.update(text_config=_text(mrope=True), tie_word_embeddings=False)
    else:  # 4.45-4.51: text fields at the top level; token ids are stored as plain attributes.
        fields.update(_text(mrope=True))
    return fields


def _thinker_fields() -> dict[str, Any]:
    return {
        **_omni_shared(),
        "text_config": _text(mrope=True),
        "vision_config": _windowed_vision(),
        # Chunks of 16 frames (real: 100, i.e. 200 frames).
        "audio_config": _audio_encoder(n_window=8, output_dim=_HIDDEN),
        "user_token_id": Tokens.USER,
        "tie_word_embeddings": False,
        "bos_token_id": Tokens.END_OF_TEXT,
        "eos_token_id": Tokens.IM_END,
        "pad_token_id": Tokens.END_OF_TEXT,
    }


def _talker_fields() -> dict[str, Any]:
    text = _text(mrope=True, vocab_size=Tokens.CODEC_VOCAB)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        del text[key]
    return {
        **text,
        **_omni_shared(),
        "embedding_size": _HIDDEN,  # = the thinker's width: the talker reads its hidden states
        "head_dim": _HEAD_DIM,
        "tts_text_start_token_id": Tokens.TTS_TEXT_START,
        "tts_text_end_token_id": Tokens.TTS_TEXT_END,
        "tts_text_pad_token_id": Tokens.TTS_TEXT_PAD,
        "tts_codec_start_token_id": Tokens.CODEC_START,
        "tts_codec_end_token_id": Tokens.CODEC_END,
        "tts_codec_pad_token_id": Tokens.CODEC_PAD,
        "tts_codec_mask_token_id": Tokens.CODEC_MASK,
        "spatial_merge_size": _MERGE,
    }


def _token2wav_fields() -> dict[str, Any]:
    dit = {
        "hidden_size": _HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": _HEAD_DIM,
        "ff_mult": 2,
        "emb_dim": 16,
        "max_position_embeddings": 1024,
        "block_size": 24,
        "look_ahead_layers": [1],
        "look_backward_layers": [0],
        "repeats": 2,
        "num_embeds": Tokens.CODEC_VOCAB,
        "mel_dim": _MEL_DIM,
        "dropout": 0.0,
        "enc_emb_dim": _SPEAKER_EMBEDDING,
        "enc_dim": 16,
        # ECAPA speaker encoder: the last channel count is the concatenation of the middle three.
        "enc_channels": [16, 16, 16, 16, 48],
        "enc_kernel_sizes": [5, 3, 3, 3, 1],
        "enc_dilations": [1, 2, 3, 4, 1],
        "enc_attention_channels": 8,
        "enc_res2net_scale": 2,
        "enc_se_channels": 8,
    }
    bigvgan = {
        "mel_dim": _MEL_DIM,
        "upsample_initial_channel": 32,
        "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3, 5]],
        "upsample_rates": [2, 2],
        "upsample_kernel_sizes": [4, 4],
    }
    return {"dit_config": dit, "bigvgan_config": bigvgan}


def speakers() -> dict[str, dict[str, Any]]:
    """The ``spk_dict.pt`` content of the full Omni model: conditioning per speaker name.

    ``cond`` is the speaker embedding and ``ref_mel`` a reference mel spectrogram (both read by
    token2wav's DiT); ``bos_token`` starts the talker's text stream. The names are the real
    checkpoint's; ``generate`` uses Chelsie unless told otherwise.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        name: {
            "cond": torch.randn(1, _SPEAKER_EMBEDDING, generator=generator),
            "ref_mel": torch.randn(1, 48, _MEL_DIM, generator=generator),
            "bos_token": bos,
        }
        for name, bos in zip(("Chelsie", "Ethan"), Tokens.SPEAKER_BOS, strict=True)
    }
