"""Inputs of any size for a Qwen model, matching an :class:`omnifix.Workload` token for token."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from omnifix._plan import Workload
    from omnifix._types import DeviceLike

#: Mel frames per second of audio (the Whisper feature extractor of Qwen2-Audio and Omni).
_FRAMES_PER_SECOND = 100
#: Patches merged into one language-model token (2x2 spatial merge in every Qwen VL tower).
_MERGE = 4


def _token_id(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    from omnifix.errors import UnsupportedModelError

    raise UnsupportedModelError(
        f"{type(config).__name__} has none of {', '.join(names)}, so the workload's media "
        "cannot be placed in the prompt. Pass a workload with text only for this model."
    )


def _grid(patches: int, frames: int = 1) -> tuple[int, int, int]:
    """A (t, h, w) patch grid of ``patches`` per frame, both sides even (the 2x2 merge)."""
    side = math.isqrt(patches)
    while patches % side or side % 2 or (patches // side) % 2:
        side -= 1
    return frames, side, patches // side


def _tower(config: Any, name: str, workload: Workload) -> Any:
    tower = getattr(config, name, None)
    if tower is None:
        from omnifix.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"{type(config).__name__} has no {name}, but the workload asks for {workload}. "
            "Pass a workload without that modality for this model."
        )
    return tower


def _audio(
    model: nn.Module, workload: Workload, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mel features, their mask and the placeholder count for ``workload.audio_seconds``."""
    import torch

    config: Any = getattr(model, "config", None)
    audio = _tower(config, "audio_config", workload)
    frames = round(workload.audio_seconds * _FRAMES_PER_SECOND)
    # Qwen2-Audio's encoder takes exactly its positional table's length (30 s on the real model).
    table = 2 * int(getattr(audio, "max_source_positions", 0))
    is_qwen2_audio = type(model).__name__.startswith("Qwen2Audio")
    if is_qwen2_audio and frames > table:
        from omnifix.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"{type(model).__name__} takes at most {table / _FRAMES_PER_SECOND:g} s of audio per "
            f"sample, the workload asks for {workload.audio_seconds:g} s. Split the audio into "
            "chunks of that length."
        )
    padded = table if is_qwen2_audio else frames
    features = torch.randn(
        workload.batch_size, int(audio.num_mel_bins), padded, generator=generator
    )
    mask = torch.zeros(workload.batch_size, padded, dtype=torch.long)
    mask[:, :frames] = 1
    after_conv = (frames - 1) // 2 + 1
    tokens = (after_conv - 2) // 2 + 1
    from omnifix.testing._inputs import _qwen2_audio_expands_in_processor

    if is_qwen2_audio and not _qwen2_audio_expands_in_processor():
        tokens = 1  # before 4.48 the model expands one placeholder itself
    return features, mask, tokens


def workload_inputs(
    model: nn.Module, workload: Workload, *, device: DeviceLike = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for ``model`` with exactly the tokens :class:`omnifix.Workload` describes.

    Images become one patch grid of ``4 * image_tokens`` patches, video a grid of
    ``ceil(video_seconds)`` temporal patches of ``4 * video_tokens_per_second`` patches each,
    audio ``100 * audio_seconds`` mel frames; the prompt holds the placeholder tokens the towers
    fill, then ``text_tokens`` random text tokens. Works for tiny and full-size configs, so a
    planner's prediction can be checked against a real run of the same workload.

    Args:
        model: A Qwen2-VL, Qwen2.5-VL, Qwen2-Audio, Qwen2.5-Omni thinker or text model (its
            ``config`` and ``forward`` decide the inputs).
        workload: The workload to build.
        device: Where the tensors go; default :func:`omnifix.input_device` of ``model``.
        seed: Seed of the random ids and features.

    Returns:
        Keyword arguments for ``model(**inputs)`` and ``model.generate(**inputs)``.

    Raises:
        UnsupportedModelError: The workload has a modality the model lacks.
        InvalidArgumentError: More audio than Qwen2-Audio takes in one sample (30 s).

    Example:
        >>> import omnifix, omnifix.testing as ot
        >>> model = ot.tiny_model("qwen2-vl")
        >>> inputs = ot.workload_inputs(model, omnifix.Workload(text_tokens=8, image_tokens=4))
        >>> inputs["input_ids"].shape, inputs["pixel_values"].shape, inputs["image_grid_thw"]
        (torch.Size([1, 12]), torch.Size([16, 1176]), tensor([[1, 4, 4]]))
    """
    import inspect

    import torch

    from omnifix._devices import input_device, normalize_device

    config: Any = getattr(model, "config", None)
    generator = torch.Generator().manual_seed(seed)
    batch = workload.batch_size
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    ids: list[int] = []
    types: list[int] = []
    extra: dict[str, torch.Tensor] = {}

    def media(key: str, grid_key: str, token: int, grid: tuple[int, int, int], kind: int) -> None:
        vision = _tower(config, "vision_config", workload)
        width = int(vision.in_channels if hasattr(vision, "in_channels") else 3)
        width *= int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
        patches = grid[0] * grid[1] * grid[2]
        extra[key] = torch.randn(patches * batch, width, generator=generator).to(dtype)
        extra[grid_key] = torch.tensor([grid] * batch)
        ids.extend([token] * (patches // _MERGE))
        types.extend([kind] * (patches // _MERGE))

    if workload.image_tokens:
        token = _token_id(config, "image_token_id", "image_token_index")
        media("pixel_values", "image_grid_thw", token, _grid(_MERGE * workload.image_tokens), 1)
    if workload.video_seconds:
        token = _token_id(config, "video_token_id", "video_token_index")
        frames = math.ceil(workload.video_seconds)
        grid = _grid(_MERGE * workload.video_tokens_per_second, frames)
        media("pixel_values_videos", "video_grid_thw", token, grid, 2)
    if workload.audio_seconds:
        features, mask, tokens = _audio(model, workload, generator)
        extra["input_features"], extra["feature_attention_mask"] = features.to(dtype), mask
        ids.extend([_token_id(config, "audio_token_id", "audio_token_index")] * tokens)
        types.extend([3] * tokens)
    text_config = getattr(config, "text_config", config)
    vocab = int(getattr(text_config, "vocab_size", 0) or getattr(config, "vocab_size", 0))
    special = {value for key, value in vars(config).items() if key.endswith(("_id", "_index"))}
    text = [
        token
        for token in torch.randint(
            0, vocab, (workload.text_tokens * 2,), generator=generator
        ).tolist()
        if token not in special
    ][: workload.text_tokens]
    ids.extend(text)
    types.extend([0] * len(text))
    input_ids = torch.tensor([ids] * batch)
    inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
    }
    forward = getattr(model, "forward", None)
    if forward is not None and "mm_token_type_ids" in inspect.signature(forward).parameters:
        inputs["mm_token_type_ids"] = torch.tensor([types] * batch)
    inputs.update(extra)
    target = input_device(model) if device is None else normalize_device(device)
    return {key: value.to(target) for key, value in inputs.items()}
