"""Model inputs matching a config: placeholder tokens, image patches, audio features.

The number of placeholder tokens has to equal what the towers produce, so it is computed from
the config exactly as the processors of the real models do.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from omnifix._compat import AUDIO_PLACEHOLDERS_EXPANDED, transformers_at_least
from omnifix._devices import normalize_device
from omnifix.errors import InvalidArgumentError, UnsupportedModelError
from omnifix.testing._configs import check_family, model_class

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from omnifix._types import DeviceLike
    from omnifix.testing._configs import Family

__all__ = [
    "IMAGE_GRID",
    "audio_tokens",
    "image_tokens",
    "qwen2_audio_expands_in_processor",
    "tiny_inputs",
]

#: The (t, h, w) patch grid of the one image per sample: 4 merged tokens with 2x2 merging.
IMAGE_GRID: Final = (1, 4, 4)

#: What the placeholders of one medium stand for: its token ids and its tensors.
_Media: TypeAlias = "tuple[list[int], dict[str, torch.Tensor]]"


def image_tokens(vision_config: Any) -> int:
    """Tokens of one :data:`IMAGE_GRID` image: each ``spatial_merge_size**2`` patches make one."""
    return math.prod(IMAGE_GRID) // int(vision_config.spatial_merge_size) ** 2


def audio_tokens(frames: int) -> int:
    """Tokens of ``frames`` mel frames: a stride-2 convolution, then a stride-2 average pool."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def qwen2_audio_expands_in_processor() -> bool:
    """Whether the installed Qwen2-Audio takes one placeholder per audio token (transformers 4.48+).

    Before 4.48 the prompt holds a single ``<|AUDIO|>`` per audio and the model expands it into
    as many positions as the audio tower makes tokens, so its logits are longer than the prompt.
    """
    return transformers_at_least(AUDIO_PLACEHOLDERS_EXPANDED)


def _id(config: Any, *names: str) -> int:
    """The first of ``names`` that ``config`` has (token ids were renamed between versions)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise _wrong_config(config, names[0])


def _wrong_config(config: Any, missing: str) -> Exception:
    return UnsupportedModelError(
        f"tiny_inputs needs {missing!r} from the config, but the {type(config).__name__} it got "
        "has none. Pass the config of the model the inputs are for (model.config), with the "
        "family that model belongs to."
    )


def _image(config: Any, generator: torch.Generator) -> _Media:
    import torch

    vision = config.vision_config
    patch = int(vision.patch_size)
    row = int(vision.in_channels) * int(vision.temporal_patch_size) * patch * patch
    tensors = {
        "pixel_values": torch.randn(math.prod(IMAGE_GRID), row, generator=generator),
        "image_grid_thw": torch.tensor([IMAGE_GRID]),
    }
    image = _id(config, "image_token_id", "image_token_index")
    start, end = _id(config, "vision_start_token_id"), _id(config, "vision_end_token_id")
    return [start, *[image] * image_tokens(vision), end], tensors


def _audio(config: Any, generator: torch.Generator, *, expanded: bool) -> _Media:
    import torch

    audio = config.audio_config
    # Qwen2-Audio wants exactly that many frames (its positional table); Omni takes them too.
    frames = 2 * int(audio.max_source_positions)
    tensors = {
        "input_features": torch.randn(1, int(audio.num_mel_bins), frames, generator=generator),
        "feature_attention_mask": torch.ones(1, frames, dtype=torch.long),
    }
    token = _id(config, "audio_token_id", "audio_token_index")
    placeholders = [token] * (audio_tokens(frames) if expanded else 1)
    start = getattr(config, "audio_start_token_id", None)
    end = getattr(config, "audio_end_token_id", None)
    if start is None or end is None:  # Qwen2-Audio's config has no <|audio_bos|>, <|audio_eos|>
        return placeholders, tensors
    return [int(start), *placeholders, int(end)], tensors


def _text_ids(
    config: Any, placeholders: list[int], count: int, generator: torch.Generator
) -> list[int]:
    """``count`` random text tokens, below every special token (Qwen puts those at the top)."""
    import torch

    named = {  # every token id the config names, text config included
        int(value)
        for fields in (config.to_dict(), config.get_text_config().to_dict())
        for key, value in fields.items()
        if key.endswith(("_token_id", "_token_index")) and isinstance(value, int)
    }
    specials = torch.tensor(sorted(named | set(placeholders)))
    ids = torch.arange(int(config.get_text_config().vocab_size))
    ordinary = ids[~torch.isin(ids, specials)]
    below = ordinary[ordinary < specials.min()]
    pool = below if len(below) > 0 else ordinary
    chosen = torch.randint(len(pool), (count,), generator=generator)
    return [int(token) for token in pool[chosen]]


def _mm_token_type_ids(family: Family, config: Any, input_ids: torch.Tensor) -> torch.Tensor | None:
    """0 text, 1 image, 2 video, 3 audio, as 5.x's processors make them; ``None`` if not taken.

    The model's forward decides: 5.x Qwen2-VL and Qwen2.5-VL take them (their M-RoPE needs them).
    """
    import torch

    # The full Omni model hands these inputs to its thinker, so the thinker's forward decides.
    forward_of: Family = "qwen2.5-omni-thinker" if family == "qwen2.5-omni" else family
    if "mm_token_type_ids" not in inspect.signature(model_class(forward_of).forward).parameters:
        return None
    types = torch.zeros_like(input_ids)
    for value, kind in enumerate(("image", "video", "audio"), start=1):
        names = (f"{kind}_token_id", f"{kind}_token_index")
        if any(getattr(config, name, None) is not None for name in names):
            types[input_ids == _id(config, *names)] = value
    return types


def tiny_inputs(
    family: Family,
    config: PretrainedConfig,
    *,
    batch_size: int = 1,
    text_tokens: int = 8,
    device: DeviceLike = "cpu",
) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``model(**inputs)`` and ``model.generate(**inputs)``.

    Each sample is ``text_tokens`` random text tokens (below every special token) with the
    family's media placeholders in the middle, laid out as the real processors do (shapes on
    docs/testing.md). Geometry and token ids are read from ``config``, so a config you changed
    gets matching inputs; the tensors depend on the arguments only (a fixed seed).

    Args:
        family: One of :data:`FAMILIES`; says which modalities to include.
        config: The model's config (``model.config``); for the full Omni model its
            ``thinker_config`` is used.
        batch_size: Number of samples.
        text_tokens: Text tokens per sample, besides the media tokens.
        device: Where to put the tensors (anything :func:`omnifix.normalize_device` takes).

    Returns:
        ``input_ids`` and an all-ones ``attention_mask`` (``batch_size x sequence``), plus
        ``pixel_values`` and ``image_grid_thw`` and/or ``input_features`` and
        ``feature_attention_mask``, plus ``mm_token_type_ids`` where the model takes them.

    Raises:
        UnsupportedModelError: ``family`` is unknown, the installed transformers predates it,
            or ``config`` lacks what the family's inputs need (e.g. a ``vision_config``).
        InvalidArgumentError: ``batch_size`` is below 1 or ``text_tokens`` below 0.

    Example:
        >>> import omnifix.testing as ot
        >>> inputs = ot.tiny_inputs("qwen2-vl", ot.tiny_config("qwen2-vl"), batch_size=2)
        >>> inputs["input_ids"].shape, inputs["pixel_values"].shape, inputs["image_grid_thw"]
        (torch.Size([2, 14]), torch.Size([32, 1176]), tensor([[1, 4, 4],
                [1, 4, 4]]))
    """
    import torch

    check_family(family)
    if batch_size < 1 or text_tokens < 0:
        raise InvalidArgumentError(
            f"tiny_inputs got batch_size={batch_size} and text_tokens={text_tokens}. "
            "Pass batch_size >= 1 and text_tokens >= 0."
        )
    target = normalize_device(device)
    source: Any = getattr(config, "thinker_config", config)  # the full Omni model's thinker
    image = family in {"qwen2-vl", "qwen2.5-vl", "qwen2.5-omni-thinker", "qwen2.5-omni"}
    audio = family in {"qwen2-audio", "qwen2.5-omni-thinker", "qwen2.5-omni"}
    for needed, tower in ((image, "vision_config"), (audio, "audio_config")):
        if needed and getattr(source, tower, None) is None:
            raise _wrong_config(source, tower)
    expanded = family != "qwen2-audio" or qwen2_audio_expands_in_processor()
    generator = torch.Generator().manual_seed(0)
    sequences: list[list[int]] = []
    tensors: dict[str, list[torch.Tensor]] = {}
    for _ in range(batch_size):
        media = [_image(source, generator)] if image else []
        if audio:
            media.append(_audio(source, generator, expanded=expanded))
        placeholders = [token for tokens, _ in media for token in tokens]
        text = _text_ids(source, placeholders, text_tokens, generator)
        half = text_tokens // 2
        sequences.append(text[:half] + placeholders + text[half:])
        for _, made in media:
            for key, value in made.items():
                tensors.setdefault(key, []).append(value)
    input_ids = torch.tensor(sequences, dtype=torch.long)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    types = _mm_token_type_ids(family, source, input_ids)
    if types is not None:
        inputs["mm_token_type_ids"] = types
    inputs.update({key: torch.cat(values) for key, values in tensors.items()})
    return {key: value.to(target) for key, value in inputs.items()}
