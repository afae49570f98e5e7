"""Helpers shared by the memory suites (``accuracy.py`` and ``capacity.py``).

Building full-size presets (or their tiny stand-ins for ``--tiny``), simulating smaller cards
with ``torch.cuda.set_per_process_memory_fraction``, moving one built model between device maps,
dispatching it the way ``from_pretrained`` (accelerate hooks) or ``load_safely`` (lean hooks and
pinned embeddings) would, running ``generate`` and reading each GPU's peak. Also the memory
model's prediction per phase (:func:`predict_phases`), which ``measure_peaks.py`` measures; its
example runs in ``tests/test_benchmarks_models.py``.

Measured peak of a GPU = ``torch.cuda.max_memory_allocated`` + what the process holds there
outside torch's allocator (CUDA context, cuBLAS/cuDNN handles): ``mem_get_info`` total - free
minus ``memory_reserved``, read right after the run.
"""

from __future__ import annotations

import gc
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from _models import gpu_index, workload_inputs
from _results import error_status

from omnifix._device_map import locate as find_entry
from omnifix._device_map import spell

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    import torch
    from torch import nn

    import omnifix

GIB = 2**30

#: The tiny family of ``omnifix.testing`` that stands in for each preset in ``--tiny`` mode.
TINY_FAMILY: dict[str, tuple[str, ...]] = {
    "qwen2.5-vl-7b": ("qwen2.5-vl", "qwen2-vl"),  # Qwen2.5-VL needs transformers 4.49
    "qwen2.5-omni-7b": ("qwen2.5-omni",),
    "qwen2-audio-7b": ("qwen2-audio",),
}

#: Module names that hold no language-model decoder layer (towers, Omni's speech parts).
_NOT_THE_LM = ("visual", "vision", "audio_tower", "talker", "token2wav")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def tiny_family(preset: str) -> str | None:
    """The tiny family standing in for ``preset`` on the installed transformers (None: none)."""
    import omnifix.testing as ot

    available = set(ot.available_families())
    return next((f for f in TINY_FAMILY[preset] if f in available), None)


def skeleton(preset: str, *, tiny: bool) -> nn.Module:
    """The whole model of ``preset`` on ``meta`` (tiny: its ``omnifix.testing`` stand-in, fp32)."""
    if not tiny:
        from omnifix._plan.skeleton import build_skeleton

        return build_skeleton(preset)
    import torch

    import omnifix.testing as ot
    from omnifix._plan.skeleton import build_on_meta

    family: Any = tiny_family(preset)
    return build_on_meta(ot.tiny_config(family), ot.model_class(family), torch.float32)


def set_attention(model: nn.Module, attn: str) -> None:
    """Switch the attention implementation in place, in every config the model's modules hold.

    ``set_attn_implementation`` first, where the installed transformers has it; then every
    module's config, because that setter misses copies (transformers 5.17 leaves T5's encoder
    and decoder, which hold copies of the config, on sdpa). Raises when a config disagrees after
    that, so that no case runs an implementation it is not labelled with.
    """
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(attn)
    configs = {
        id(config): config
        for module in model.modules()
        if hasattr(config := getattr(module, "config", None), "_attn_implementation")
    }
    for config in configs.values():
        if config._attn_implementation != attn:  # noqa: SLF001 - no public setter on a copy
            config._attn_implementation = attn  # noqa: SLF001
    wrong = {c._attn_implementation for c in configs.values()} - {attn}  # noqa: SLF001
    if wrong:
        msg = f"{type(model).__name__}: configs still ask for {sorted(wrong)} after {attn!r}"
        raise RuntimeError(msg)


def on_cpu(device_map: Mapping[str, int | str]) -> dict[str, int | str]:
    """``device_map`` with every GPU replaced by the cpu (``--tiny`` runs the maps on the cpu)."""
    return {
        name: "cpu" if gpu_index(device) is not None else device
        for name, device in device_map.items()
    }


def locate(device_map: Mapping[str, int | str], name: str) -> int | str:
    """The device ``device_map`` gives tensor/module ``name``: its longest matching prefix."""
    found = find_entry(device_map, name)
    if found is None:
        msg = f"device_map places nothing that holds {name!r}"
        raise KeyError(msg)
    return found[1]


def weights_by_device(model: nn.Module, device_map: Mapping[str, int | str]) -> dict[str, int]:
    """Bytes of parameters and buffers ``device_map`` puts on each device (tied ones once).

    The anchor ``accelerate estimate-memory`` stands for: it reports a whole model's weights.
    """
    seen: set[int] = set()
    sizes: dict[str, int] = {}
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key = device_name(locate(device_map, name))
        sizes[key] = sizes.get(key, 0) + tensor.numel() * tensor.element_size()
    return sizes


def _text_config(config: Any) -> Any:
    config = getattr(config, "thinker_config", config)  # the whole Qwen2.5-Omni
    return getattr(config, "text_config", config)


def decoder_layers(model: nn.Module) -> list[str]:
    """Names of the language model's decoder layers (the ones that hold the KV cache)."""
    from torch import nn

    text = _text_config(model.config)
    count = int(text.num_hidden_layers)
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and name.split(".")[-1] == "layers"
            and len(module) == count
            and not any(part in _NOT_THE_LM for part in name.split("."))
        ):
            return [f"{name}.{index}" for index in range(count)]
    msg = f"no language-model decoder layers found in {type(model).__name__}"
    raise LookupError(msg)


def kv_bytes_per_token(model: nn.Module, dtype_bytes: int) -> int:
    """``2 * kv_heads * head_dim * bytes``: one decoder layer's KV cache per token, from config."""
    text = _text_config(model.config)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    return 2 * kv_heads * int(head_dim) * dtype_bytes


def kv_by_device(
    model: nn.Module, device_map: Mapping[str, int | str], *, tokens: int, dtype_bytes: int
) -> dict[str, int]:
    """KV cache bytes of each device's decoder layers for ``tokens`` (batch included) tokens.

    The anchor hf-mem stands for (weights + KV cache), computed from the config, not the planner.
    """
    per_layer = kv_bytes_per_token(model, dtype_bytes) * tokens
    sizes: dict[str, int] = {}
    for layer in decoder_layers(model):
        key = device_name(locate(device_map, layer))
        sizes[key] = sizes.get(key, 0) + per_layer
    return sizes


def device_name(device: int | str) -> str:
    """``0`` -> ``"cuda:0"``; names spelled as omnifix spells them."""
    return spell(device, index_type="cuda")


def gpus_of(device_map: Mapping[str, int | str]) -> list[int]:
    """The GPU indices a map uses (``0`` or ``"cuda:0"``), sorted."""
    return sorted({i for i in map(gpu_index, device_map.values()) if i is not None})


# ----------------------------------------------------------------------------------------------
# GPUs: context, caps, peaks
# ----------------------------------------------------------------------------------------------


def free_memory() -> None:
    """Collect garbage and give cached blocks back (after a case, and after every OOM).

    Only where CUDA is: on the cpu (``--tiny``) reference counting frees what matters, and a full
    collection of a heap holding transformers costs 0.2 s a call.
    """
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def outside_allocator(device: int) -> int:
    """Bytes the process holds on ``device`` outside torch's allocator (context, libraries)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def warm_up(devices: Iterable[int]) -> dict[int, int]:
    """Create the CUDA context and cuBLAS handle on each GPU; return each one's outside bytes."""
    import torch

    contexts: dict[int, int] = {}
    for device in devices:
        x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
        (x @ x).sum().item()
        q = x.view(1, 1, 256, 256)
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
        del x, q
        torch.cuda.synchronize(device)
    free_memory()
    for device in devices:
        contexts[device] = outside_allocator(device)
    return contexts


def set_caps(caps: Mapping[int, int | None], contexts: Mapping[int, int]) -> dict[int, float]:
    """Cap each GPU's allocator so allocator + context stays within ``caps[gpu]`` bytes.

    ``None`` lifts the cap. A card of ``cap`` bytes leaves ``cap - context`` to the allocator,
    which is what ``set_per_process_memory_fraction`` limits. Returns the fractions set.
    """
    import torch

    fractions: dict[int, float] = {}
    for device, cap in caps.items():
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = 1.0 if cap is None else min(1.0, max(0.0, (cap - contexts[device]) / total))
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        fractions[device] = round(fraction, 5)
    return fractions


@dataclass
class Peaks:
    """One run: its status and, per GPU, the measured peak (allocator peak + outside bytes)."""

    status: str
    seconds: float
    peaks: dict[str, int] = field(default_factory=dict)
    #: Allocated on each GPU before the run (the weights, and anything a previous run left).
    before: dict[str, int] = field(default_factory=dict)


def run_generate(
    model: nn.Module,
    target: nn.Module,
    workload: omnifix.Workload,
    *,
    gpus: list[int],
    device: torch.device | None = None,
) -> Peaks:
    """Build ``workload``'s inputs, run ``generate`` greedily for exactly its new tokens, measure.

    ``target`` is what reads the inputs (the thinker of a whole Qwen2.5-Omni); ``model`` is what
    generates: the whole Omni model generates text through its own ``generate`` (talker loaded,
    audio output off), every other model is its own target. An OOM (or any error) is a status.
    """
    import torch

    before: dict[str, int] = {}
    for gpu in gpus:
        torch.cuda.synchronize(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)
        before[f"cuda:{gpu}"] = torch.cuda.memory_allocated(gpu)
    start = time.perf_counter()
    status = "ok"
    inputs: dict[str, Any] = {}
    try:
        inputs = workload_inputs(target, workload, device=device)
        with torch.inference_mode():
            generate(model, target, inputs, workload.max_new_tokens)
        for gpu in gpus:
            torch.cuda.synchronize(gpu)
    except Exception as error:  # noqa: BLE001 - a failed run (out of memory too) is a result
        status = error_status(error)
    seconds = round(time.perf_counter() - start, 3)
    peaks = {
        f"cuda:{gpu}": torch.cuda.max_memory_allocated(gpu) + outside_allocator(gpu) for gpu in gpus
    }
    del inputs
    free_memory()
    return Peaks(status=status, seconds=seconds, peaks=peaks, before=before)


def generate(model: nn.Module, target: nn.Module, inputs: dict[str, Any], new_tokens: int) -> Any:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (text only for the whole Omni)."""
    if model is target:
        return target.generate(  # type: ignore[operator]
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    options: dict[str, Any] = {
        "thinker_max_new_tokens": new_tokens,
        "thinker_min_new_tokens": new_tokens,
        "thinker_do_sample": False,
    }
    # 4.52-4.57 spell "text only" return_audio=False, 5.x generation_mode="text".
    if "return_audio" in inspect.signature(model.generate).parameters:
        options["return_audio"] = False
    else:
        options["generation_mode"] = "text"
    # generate() checks the speaker before anything else, even for text only; a model built from
    # its config has no speaker files (spk_dict.pt). Text output never reads the entry.
    speakers = getattr(model, "speaker_map", None)
    if isinstance(speakers, dict) and "Chelsie" not in speakers:
        speakers["Chelsie"] = {}
    return model.generate(**inputs, **options)  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------
# Placement: one built model moved between maps and dispatched
# ----------------------------------------------------------------------------------------------


@dataclass
class Placed:
    """The dispatch state of a built model: its map, hook style and what must be undone."""

    device_map: dict[str, int | str]
    hooks: str
    undo: list[Callable[[], None]] = field(default_factory=list)


def undispatch(model: nn.Module, placed: Placed | None) -> None:
    """Remove lean hooks, embedding pins and accelerate's hooks (what dispatch added)."""
    from accelerate.hooks import remove_hook_from_submodules

    if placed is not None:
        for undo in reversed(placed.undo):
            undo()
        placed.undo.clear()
    remove_hook_from_submodules(model)


def move(model: nn.Module, device_map: Mapping[str, int | str]) -> None:
    """``module.to(device)`` for each map entry, parents before children.

    An entry naming a single parameter or buffer (accelerate emits those for modules that hold
    tensors of their own next to children) moves that tensor alone.
    """
    from accelerate.utils import set_module_tensor_to_device
    from torch import nn

    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name in sorted(device_map, key=lambda key: (key.count(".") + bool(key), key)):
        device = device_name(device_map[name])
        if name in tensors:
            set_module_tensor_to_device(model, name, device, value=tensors[name].data.to(device))
            continue
        module = model.get_submodule(name) if name else model
        # nn.Module.to itself: dispatch_model wraps model.to with a warning.
        nn.Module.to(module, device)


def dispatch(model: nn.Module, device_map: Mapping[str, int | str], *, hooks: str) -> Placed:
    """Dispatch a model whose weights already sit where ``device_map`` says.

    ``hooks="accelerate"``: accelerate's ``dispatch_model``, what ``from_pretrained`` does for a
    ``device_map``. ``hooks="lean"``: what ``omnifix.load_safely`` does: ``omnifix.lean_dispatch``
    (hooks only where tensors cross devices), then ``pin_embeddings`` when several devices.
    """
    import omnifix

    placed = Placed(device_map=dict(device_map), hooks=hooks)
    devices = set(device_map.values())
    if hooks == "accelerate":
        from accelerate import dispatch_model

        dispatch_model(model, device_map=dict(device_map))
        return placed
    if hooks != "lean":
        msg = f"hooks={hooks!r}: pass 'lean' or 'accelerate'"
        raise ValueError(msg)
    handle = omnifix.lean_dispatch(model, device_map=dict(device_map))  # type: ignore[attr-defined]
    placed.undo.append(handle.remove)
    if len(devices) > 1:
        try:
            pin = omnifix.pin_embeddings(model)
        except omnifix.UnsupportedModelError:  # no token embedding: nothing to pin
            pass
        else:
            placed.undo.append(pin.remove)
    return placed


def place(
    model: nn.Module, placed: Placed | None, device_map: Mapping[str, int | str], *, hooks: str
) -> Placed:
    """Move a dispatched model to ``device_map``: remove the hooks, move modules, dispatch again."""
    undispatch(model, placed)
    move(model, device_map)
    free_memory()
    return dispatch(model, device_map, hooks=hooks)


def round_up(size: float, unit: int) -> int:
    """``size`` rounded up to a whole number of ``unit``."""
    return math.ceil(size / unit) * unit


# ----------------------------------------------------------------------------------------------
# Predictions: the memory model per phase
# ----------------------------------------------------------------------------------------------


def predict_phases(
    model: object,
    *,
    workload: omnifix.Workload,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str = "bfloat16",
    include_inputs: bool = False,
) -> dict[str, int]:
    """Predicted peak above the weights of each phase, with the whole model on one GPU.

    The numbers ``benchmarks/measure_peaks.py`` measures, for comparing the memory model with
    GPU measurements and re-fitting ``omnifix._plan.estimate.CALIBRATION``: ``"prefill"`` and
    ``"logits"`` include the KV cache (the language-model peak is the larger of the two),
    ``"vision"``/``"video"``/``"audio"`` are the tower calls (no KV cache yet). Fixed costs (CUDA
    context, cuBLAS workspace) and the margin's fresh blocks are not included; nor is the
    ``"logits copy"`` phase, which only a split has (a plan's rows report it).

    Args:
        model: As for :func:`omnifix.plan_placement`.
        workload: The case.
        attn_implementation: As for :func:`omnifix.plan_placement` (``"auto"`` is not resolved
            here).
        dtype: Dtype of the weights and activations.
        include_inputs: Add the input tensors (measurements taken above a baseline that already
            holds them exclude them).

    Example:
        >>> import omnifix
        >>> work = omnifix.Workload(text_tokens=8192, max_new_tokens=1)
        >>> phases = predict_phases("qwen2-vl-7b", workload=work)
        >>> sorted(phases), round(phases["prefill"] / 2**30, 2)  # Qwen2.5-VL-7B's LM: 1.53
        (['decode', 'logits', 'prefill'], 1.53)
    """
    import torch

    from omnifix._attention import parse_dtype
    from omnifix._plan.estimate import estimate
    from omnifix._plan.skeleton import load_skeleton

    skeleton = load_skeleton(model, model_class=None, dtype=parse_dtype(dtype) or torch.bfloat16)
    usage = estimate(
        skeleton.anatomy,
        execution_device=lambda _: "cuda:0",
        load=workload,
        dtype=skeleton.dtype,
        attn_implementation=attn_implementation,
        include_inputs=include_inputs,
    )
    phases = dict(usage["cuda:0"].phases)
    if include_inputs:
        phases = {phase: size + usage["cuda:0"].inputs for phase, size in phases.items()}
    return phases
