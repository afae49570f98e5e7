"""Models for the suites: random weights on a device map, inputs of any workload, split maps.

- :func:`materialize` gives a ``meta`` skeleton (a full-size preset or a tiny model) random
  weights where a device map puts them, dispatched as ``from_pretrained`` would: what a real
  checkpoint loaded with that map allocates, without downloading one.
- :func:`workload_inputs` builds inputs with exactly the tokens of an :class:`omnifix.Workload`,
  for tiny and full-size configs, so a planner's prediction can be checked against a real run.
- :func:`layer_split_map` splits every language model of a model layer by layer over two devices
  (any device values: ints on GPUs, ``"cpu"`` in CPU tests).

The examples run in ``tests/test_benchmarks_models.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final, TypeVar

from omnifix._device_map import locate
from omnifix.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    import omnifix

#: Mel frames per second of audio (the Whisper feature extractor of Qwen2-Audio and Omni).
_FRAMES_PER_SECOND = 100
#: Patches merged into one language-model token (2x2 spatial merge in every Qwen VL tower).
_MERGE = 4
# Modules kept whole, on the first device: towers, the projector, Omni's vocoder.
_TOWERS: Final = frozenset({"visual", "audio_tower", "multi_modal_projector", "token2wav"})
# Modules that go to the second device, with the second half of the layers.
_LATE: Final = frozenset({"norm", "lm_head", "rotary_emb"})

_D = TypeVar("_D")


# ----------------------------------------------------------------------------------------------
# Random weights on a device map
# ----------------------------------------------------------------------------------------------


def gpu_index(value: object) -> int | None:
    """The GPU index of a device_map value (``0`` or ``"cuda:0"``); ``None`` for cpu, disk, ..."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    kind, _, index = str(value).partition(":")
    return int(index) if kind == "cuda" and index.isdigit() else None


def _device_of(device_map: Mapping[str, int | str], name: str) -> int | str:
    found = locate(device_map, name)
    if found is None:
        raise InvalidArgumentError(
            f"device_map places no module that holds {name!r}. "
            "Pass a device_map that covers every parameter, such as PlacementPlan.device_map."
        )
    return found[1]


def materialize(
    model: nn.Module, device_map: Mapping[str, int | str], *, std: float = 0.02, seed: int = 0
) -> nn.Module:
    """Give a ``meta`` skeleton random weights on the devices of ``device_map``, then dispatch it.

    Every parameter and buffer still on ``meta`` is created on its device (the longest
    ``device_map`` prefix that holds it) and drawn from N(0, ``std``); real tensors (buffers the
    model computed while it was built, such as rotary tables) move to their device unchanged.
    Tied weights stay tied. Then, when the map uses several devices, accelerate's
    ``dispatch_model`` adds the same hooks ``from_pretrained`` adds. The result allocates what a
    real checkpoint loaded with that map would, which is what memory measurements need.

    Args:
        model: A model whose parameters are on ``meta`` (e.g. from ``init_empty_weights()``).
        device_map: ``{module_name: device}`` covering every parameter; ``"cpu"`` is allowed,
            ``"disk"`` is not (there is no checkpoint to offload from).
        std: Standard deviation of the random weights.
        seed: Seed of the random weights.

    Returns:
        ``model`` itself, materialised and dispatched.

    Raises:
        InvalidArgumentError: ``device_map`` misses a parameter or names ``"disk"``.

    Example:
        >>> import omnifix.testing as ot
        >>> from accelerate import init_empty_weights
        >>> config = ot.tiny_config("qwen2")
        >>> with init_empty_weights():
        ...     skeleton = ot.model_class("qwen2")(config)
        >>> model = materialize(skeleton, {"": "cpu"})
        >>> {p.device.type for p in model.parameters()}
        {'cpu'}
    """
    import torch
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device

    from omnifix.errors import InvalidArgumentError

    if "disk" in device_map.values():
        raise InvalidArgumentError(
            "materialize() cannot place modules on 'disk': there is no checkpoint to offload. "
            "Map them to 'cpu' or a GPU instead."
        )
    # One generator per device: drawing 8B values on the CPU and copying them over takes minutes.
    generators: dict[torch.device, torch.Generator] = {}
    done: dict[int, torch.Tensor] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, tensor in named:
        device = torch.device(_device_of(device_map, name))
        if id(tensor) in done:  # a tied weight: point this name at the tensor already made
            set_module_tensor_to_device(model, name, device, value=done[id(tensor)])
            continue
        if tensor.device.type == "meta":
            value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            if value.is_floating_point():
                if device not in generators:
                    generators[device] = torch.Generator(device=device).manual_seed(seed)
                value.normal_(0.0, std, generator=generators[device])
            else:
                value.zero_()
        else:
            value = tensor.detach().to(device)
        set_module_tensor_to_device(model, name, device, value=value)
        done[id(tensor)] = value
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    if len(set(device_map.values())) > 1:
        dispatch_model(model, device_map=dict(device_map))
    return model


# ----------------------------------------------------------------------------------------------
# Inputs of a workload
# ----------------------------------------------------------------------------------------------


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


def _tower(config: Any, name: str, workload: omnifix.Workload) -> Any:
    tower = getattr(config, name, None)
    if tower is None:
        from omnifix.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"{type(config).__name__} has no {name}, but the workload asks for {workload}. "
            "Pass a workload without that modality for this model."
        )
    return tower


def _audio(
    model: nn.Module, workload: omnifix.Workload, generator: torch.Generator
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
    from omnifix.testing._inputs import qwen2_audio_expands_in_processor

    if is_qwen2_audio and not qwen2_audio_expands_in_processor():
        tokens = 1  # before 4.48 the model expands one placeholder itself
    return features, mask, tokens


def workload_inputs(
    model: nn.Module,
    workload: omnifix.Workload,
    *,
    device: omnifix.DeviceLike = None,
    seed: int = 0,
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
        >>> inputs = workload_inputs(model, omnifix.Workload(text_tokens=8, image_tokens=4))
        >>> inputs["input_ids"].shape, inputs["pixel_values"].shape, inputs["image_grid_thw"]
        (torch.Size([1, 12]), torch.Size([16, 1176]), tensor([[1, 4, 4]]))
    """
    import inspect

    import torch

    from omnifix import input_device, normalize_device

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
    special: set[int] = set()
    for key, value in vars(config).items():
        if key.endswith(("_id", "_index")):  # an int, or a list of them (Llama 3's eos ids)
            special.update(value if isinstance(value, list) else [value])
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


# ----------------------------------------------------------------------------------------------
# A per-layer split
# ----------------------------------------------------------------------------------------------


def layer_split_map(model: nn.Module, first: _D, second: _D) -> dict[str, _D]:
    """A per-layer ``device_map``: the first half of the layers on ``first``, the rest after.

    The final norm, rotary embedding and ``lm_head`` go with the second half, to ``second``;
    towers, projector and embeddings stay whole on ``first``. Every language model is split
    (Qwen2.5-Omni: thinker and talker). Module names are read from the model, since they differ
    between transformers versions; any device values work (ints, ``"cpu"``, ``"disk"``), so the
    same map serves CPU tests and two-GPU ones.

    Example:
        >>> import omnifix.testing as ot
        >>> device_map = layer_split_map(ot.tiny_model("qwen2"), 0, 1)
        >>> [device_map[f"model.layers.{i}"] for i in range(4)], device_map["lm_head"]
        ([0, 0, 1, 1], 1)
    """
    from torch import nn

    layers = {
        name: len(module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.endswith("layers")
        and not _TOWERS & set(name.split("."))
    }
    device_map: dict[str, _D] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for child, submodule in module.named_children():
            name = f"{prefix}.{child}" if prefix else child
            if name in layers:
                count = layers[name]
                for index in range(count):
                    device_map[f"{name}.{index}"] = first if index < count // 2 else second
            elif any(layer.startswith(name + ".") for layer in layers):
                visit(name, submodule)
            else:
                device_map[name] = second if child in _LATE else first

    visit("", model)
    return device_map
