"""The memory model: what a workload adds on top of the weights, device by device.

For a placement (where each module computes) it predicts each device's KV cache, inputs and the
transient peak of every phase that runs there (prefill, logits, logits copy, towers), with the
fresh blocks the CUDA caching allocator may need above each peak. docs/loading.md explains the
model; :data:`CALIBRATION` holds its constants and the GPU measurements they were fitted to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from omnifix._units import MIB

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from omnifix._plan.anatomy import Anatomy, Decoder, Tower
    from omnifix._plan.workload import Workload

__all__ = ["CALIBRATION", "Calibration", "Figure", "PhasePeaks", "estimate", "score_bytes"]


@dataclass(frozen=True)
class Figure:
    """One measured peak above the weights (bytes of ``max_memory_allocated``, batch 1)."""

    preset: str
    attn: str
    text_tokens: int
    image_tokens: int
    #: ``"prefill"``: the language-model phase (KV cache included); ``"vision"``: the tower call.
    phase: Literal["prefill", "vision"]
    gib: float
    #: The run's first case: it also holds the one-time cuBLAS workspaces.
    first_case: bool = False


@dataclass(frozen=True)
class Calibration:
    """Every fitted or assumed constant of the memory model, with the data behind it."""

    #: Hidden-size values per token at the MLP peak besides the ``mlp_buffers`` intermediate
    #: ones (residual, normed input, kept embeddings, rotary tables). Fitted: sdpa 8k-32k give
    #: 4.07-4.12.
    lm_mlp_hidden: float
    #: Hidden-size values per token around eager attention (residual, normed, q, rotated q, k/v
    #: repeated). Fitted to eager 8k: 6.2; code reading: ~6.4.
    lm_attn_hidden: float
    #: Width-size values per patch at a vision block's peak (fp32 rotary copies of q and k count
    #: double). Fitted to ViT sdpa, 1280 and 4096 image tokens: 17.4.
    vision_width: float
    #: The same for an audio encoder layer; not measured yet: code reading.
    audio_width: float
    #: Bytes per eager score in bf16 (or cpu fp16): the scores, softmax's fp32 copy and output.
    eager_score_bytes: int
    #: Bytes per score where the softmax needs no copy (fp32, or fp16 on CUDA's fused kernel).
    eager_score_bytes_fused: int
    #: cuBLAS/cuBLASLt workspaces of the first matmul on a GPU (the 2k case: 59 MiB above linear).
    workspace: int
    #: What the CUDA context takes from ``mem_get_info`` (typical for torch 2.x on an H100).
    cuda_context: int
    #: Kept free on every device for allocator rounding and fragmentation ...
    margin_bytes: int
    #: ... plus this share of the predicted KV cache + activations (the model's error bound).
    margin_fraction: float
    #: Extra margin, a share of the activation peak, where eager attention runs: its multi-GiB
    #: fp32 softmax copy may stay reserved in unusable pieces. Measured: Qwen2.5-VL-7B eager, a
    #: 2560-token image on a 24 GiB cap: 21.19 GiB allocated, then an OOM asking 6.25 GiB more
    #: with 6.25 GiB reserved but unallocated (H200, torch 2.11).
    eager_block_fraction: float
    #: Fresh segments kept free above a phase's peak, in units of its largest transient block (an
    #: MLP intermediate, the input device's logits copy): cached segments are split by smaller
    #: tensors, so such a block needs a new one. Measured (H200, torch 2.11, transformers 5.17,
    #: benchmarks/accuracy.py): Qwen2.5-VL-7B text 32k split on 2 x 15 GiB, peak within 0.1 % of
    #: the prediction, then an OOM asking 1.16 GiB (one 32768 x 18944 bf16 intermediate); the
    #: logits copies of Qwen2-Audio-7B (8k, 2.38 GiB) and the Omni-7B thinker (32k, 9.28 GiB)
    #: failed likewise. lm_head's own logits need none (allocated within 2.2 GB of the peak).
    fresh_blocks: int
    #: The same for eager's fp32 softmax output (``batch x heads x L^2 x 4``): the margin keeps
    #: ``max(eager_block_fraction x activations, eager_fresh_blocks x block)``. Measured:
    #: Qwen2.5-VL-7B text 8k eager split on 2 x 37 GiB, peak within 0.3 %, then an OOM asking
    #: 7.00 GiB (28 x 8192^2 x 4 B) with 7 GiB reserved but unusable.
    eager_fresh_blocks: int
    #: The measurements the coefficients were fitted to.
    figures: tuple[Figure, ...] = field(default=())
    #: Where the figures come from.
    source: str = ""


#: The constants of the memory model. Re-fit here when new GPU measurements come in.
CALIBRATION: Final = Calibration(
    lm_mlp_hidden=4.1,
    lm_attn_hidden=6.0,
    vision_width=17.4,
    audio_width=8.0,
    eager_score_bytes=10,
    eager_score_bytes_fused=8,
    workspace=64 * MIB,
    cuda_context=512 * MIB,
    margin_bytes=256 * MIB,
    margin_fraction=0.10,
    eager_block_fraction=0.40,
    fresh_blocks=1,
    eager_fresh_blocks=2,
    figures=(
        Figure("qwen2.5-vl-7b", "sdpa", 2048, 0, "prefill", 0.44, first_case=True),
        Figure("qwen2.5-vl-7b", "sdpa", 8192, 0, "prefill", 1.53),
        Figure("qwen2.5-vl-7b", "sdpa", 16384, 0, "prefill", 3.06),
        Figure("qwen2.5-vl-7b", "sdpa", 32768, 0, "prefill", 6.11),
        Figure("qwen2.5-vl-7b", "eager", 8192, 0, "prefill", 18.4),
        Figure("qwen2.5-vl-7b", "sdpa", 0, 1280, "vision", 0.21),
        Figure("qwen2.5-vl-7b", "eager", 0, 1280, "vision", 4.0),
        Figure("qwen2.5-vl-7b", "sdpa", 0, 4096, "vision", 0.68),
        Figure("qwen2.5-vl-7b", "eager", 0, 4096, "vision", 40.3),
    ),
    source=(
        "Qwen2.5-VL-7B architecture, random bf16 weights, transformers 5.17, one H100, batch 1, "
        "generate(max_new_tokens=1); peak above the weights from max_memory_allocated "
        "(benchmarks/measure_peaks.py)"
    ),
)

#: Audio-encoder positions per second (100 mel frames/s, stride-2 conv), before the pooling.
_AUDIO_POSITIONS_PER_SECOND: Final = 50
_MEL_FRAMES_PER_SECOND: Final = 100
#: Patches per merged vision token (2x2 spatial merge).
_PATCHES_PER_TOKEN: Final = 4
#: Bytes per input id, attention-mask entry and position id (int64), x3 for M-RoPE positions.
_INPUT_BYTES_PER_TOKEN: Final = 8 * 5
_FP32: Final = 4
#: Language-model phases: they run with the device's whole KV cache alive.
_LM_PHASES: Final = ("prefill", "talker", "logits", "logits copy")


@dataclass
class PhasePeaks:
    """One device's predicted use above its weights, per phase (bytes)."""

    kv_cache: int = 0
    inputs: int = 0
    #: Peak above weights + inputs of each phase that runs here (KV cache included where alive).
    phases: dict[str, int] = field(default_factory=dict)
    #: Fresh memory each phase may need above its peak (GPU phases only).
    blocks: dict[str, int] = field(default_factory=dict)

    def add_phase(self, phase: str, size: float, block: float = 0) -> None:
        """Keep the largest estimate of ``phase`` and of its fresh blocks."""
        self.phases[phase] = max(self.phases.get(phase, 0), int(size))
        if block:
            self.blocks[phase] = max(self.blocks.get(phase, 0), int(block))

    @property
    def fresh(self) -> int:
        """What the highest phase peak + its fresh blocks needs above the highest peak."""
        peak = max(self.phases.values(), default=0)
        need = max((size + self.blocks.get(p, 0) for p, size in self.phases.items()), default=0)
        return max(0, need - peak)

    @property
    def peak_phase(self) -> str:
        """The phase with the highest peak (``""`` when nothing runs here)."""
        return max(self.phases, key=lambda p: self.phases[p]) if self.phases else ""

    @property
    def activations(self) -> int:
        """The transient peak on top of weights + KV cache (inputs included)."""
        return max(0, max(self.phases.values(), default=0) - self.kv_cache) + self.inputs


def score_bytes(dtype: torch.dtype, *, cuda: bool, calibration: Calibration = CALIBRATION) -> int:
    """Bytes per eager attention score (see :class:`Calibration`)."""
    import torch

    if dtype == torch.float32 or (cuda and dtype == torch.float16):
        return calibration.eager_score_bytes_fused
    return calibration.eager_score_bytes


@dataclass(frozen=True)
class _Context:
    itemsize: int
    dtype: torch.dtype
    eager: bool
    calibration: Calibration
    include_inputs: bool

    def scores(self, device: str) -> int:
        return score_bytes(self.dtype, cuda=device.startswith("cuda"), calibration=self.calibration)

    def fresh(self, device: str, block: float, scores: float = 0) -> float:
        """Fresh memory for a phase whose largest blocks are ``block`` and fp32 ``scores``."""
        if not device.startswith("cuda"):  # only the CUDA caching allocator needs it
            return 0
        cal = self.calibration
        return max(cal.fresh_blocks * block, cal.eager_fresh_blocks * scores)


def _prefill(decoder: Decoder, tokens: int, load: Workload, ctx: _Context, device: str) -> float:
    """Peak of one decoder layer's forward over ``tokens`` prompt tokens (KV cache excluded)."""
    cal, b, rows = ctx.calibration, ctx.itemsize, load.batch_size * tokens
    mlp = (
        rows * b * (decoder.mlp_buffers * decoder.intermediate + cal.lm_mlp_hidden * decoder.hidden)
    )
    attention = rows * b * cal.lm_attn_hidden * decoder.hidden
    if ctx.eager:  # batch x heads x S^2 scores, and the batch x S^2 additive mask
        square = load.batch_size * tokens * tokens
        attention += square * (decoder.heads * ctx.scores(device) + b)
    return max(mlp, attention)


def _prefill_fresh(
    decoder: Decoder, tokens: int, load: Workload, ctx: _Context, device: str
) -> float:
    """Fresh blocks of a decoder layer: its MLP intermediate, eager's fp32 softmax output."""
    rows = load.batch_size * tokens
    scores = load.batch_size * decoder.heads * tokens * tokens * _FP32 if ctx.eager else 0
    return ctx.fresh(device, rows * decoder.intermediate * ctx.itemsize, scores)


def _logits_rows(anatomy: Anatomy, tokens: int) -> int:
    return 1 if anatomy.last_token_logits else tokens


def _tower_call(tower: Tower, patches: int, segment: int, ctx: _Context, device: str) -> float:
    """Peak of one tower call over ``patches`` positions, attention ``segment`` long."""
    cal, b = ctx.calibration, ctx.itemsize
    width = cal.vision_width if tower.kind == "vision" else cal.audio_width
    per_position = max(
        width * tower.width, tower.mlp_buffers * tower.intermediate + 2 * tower.width
    )
    linear = patches * b * per_position
    if tower.kind == "vision" and ctx.include_inputs:
        linear += patches * tower.input_width * b  # fp32 pixel_values cast to the model dtype
    # Flash kernels build no mask, so they would need less; they are modelled as sdpa, the
    # measured upper bound, until a flash-attn build can be measured (docs/benchmarks.md).
    if tower.layout == "full_mask":  # a bool mask for the 4.45 vision sdpa, else model dtype
        mask = patches * patches * (1 if tower.kind == "vision" and not ctx.eager else b)
        scores = tower.heads * patches * patches * ctx.scores(device) if ctx.eager else 0
        return linear + mask + scores
    if not ctx.eager:
        return linear
    if tower.layout == "batched":  # padded clips in one batch, with their padding mask
        clips = patches // segment
        return linear + clips * segment * segment * (tower.heads * ctx.scores(device) + b)
    return linear + segment * segment * tower.heads * ctx.scores(device)  # one segment at a time


def _tower_fresh(tower: Tower, patches: int, segment: int, ctx: _Context, device: str) -> float:
    """Fresh blocks of a tower layer: its MLP intermediate, eager's fp32 softmax output."""
    mlp = patches * tower.intermediate * ctx.itemsize
    if not ctx.eager:
        return ctx.fresh(device, mlp)
    if tower.layout == "full_mask":
        square = patches * patches
    elif tower.layout == "batched":  # the padded clips' scores are one tensor
        square = (patches // segment) * segment * segment
    else:
        square = segment * segment
    return ctx.fresh(device, mlp, tower.heads * square * _FP32)


def _vision_calls(load: Workload) -> list[tuple[str, int, int]]:
    """``(phase, patches, segment)`` of each vision call: images, then videos."""
    calls = []
    if load.image_tokens:
        per_image = _PATCHES_PER_TOKEN * load.image_tokens
        calls.append(("vision", load.batch_size * per_image, per_image))
    if load.video_tokens:
        frame = _PATCHES_PER_TOKEN * max(1, load.video_tokens_per_second)
        calls.append(("video", load.batch_size * _PATCHES_PER_TOKEN * load.video_tokens, frame))
    return calls


def _audio_call(tower: Tower, load: Workload) -> tuple[int, int]:
    """``(positions, segment)`` of the audio call."""
    if tower.layout == "batched":  # every clip padded to whole 30 s chunks
        chunks = math.ceil(load.audio_seconds / (tower.segment / _AUDIO_POSITIONS_PER_SECOND))
        return load.batch_size * chunks * tower.segment, tower.segment
    positions = load.batch_size * math.ceil(load.audio_seconds * _AUDIO_POSITIONS_PER_SECOND)
    return positions, max(1, tower.segment)


def _input_bytes(anatomy: Anatomy, load: Workload) -> int:
    """Inputs as processors return them (fp32 pixels and features), alive through generate."""
    size = load.batch_size * load.prompt_tokens * _INPUT_BYTES_PER_TOKEN
    for tower in anatomy.towers:
        if tower.kind == "vision":
            patches = _PATCHES_PER_TOKEN * (load.image_tokens + load.video_tokens)
            size += load.batch_size * patches * tower.input_width * _FP32
        elif load.audio_seconds:
            positions, _ = _audio_call(tower, load)
            frames = positions * _MEL_FRAMES_PER_SECOND // _AUDIO_POSITIONS_PER_SECOND
            size += frames * (tower.input_width * _FP32 + 8)
    return size


def estimate(
    anatomy: Anatomy,
    *,
    execution_device: Callable[[str], str],
    load: Workload,
    dtype: torch.dtype,
    attn_implementation: str,
    calibration: Calibration = CALIBRATION,
    include_inputs: bool = True,
) -> dict[str, PhasePeaks]:
    """KV cache, inputs and per-phase activation peaks on each device that computes.

    Args:
        anatomy: From :func:`omnifix._plan.anatomy.describe`.
        execution_device: Where the module of a given name computes.
        load: The workload.
        dtype: Dtype of the activations and the KV cache.
        attn_implementation: ``"eager"`` materialises attention scores; any other (flash
            kernels included) is modelled as sdpa.
        calibration: The constants.
        include_inputs: Count the input tensors (the calibration figures exclude them).

    Returns:
        ``{device: peaks}``, for every device where something computes.
    """
    import torch

    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    ctx = _Context(itemsize, dtype, attn_implementation == "eager", calibration, include_inputs)
    usage: dict[str, PhasePeaks] = {}
    for decoder in anatomy.decoders:
        if decoder.role == "text" or load.audio_output:
            _decoder_usage(usage, decoder, anatomy, execution_device, load, ctx)
    _copy_usage(usage, anatomy, execution_device, load, ctx)
    for peaks in usage.values():
        for phase in _LM_PHASES:
            if phase in peaks.phases:
                peaks.phases[phase] += peaks.kv_cache
    for tower in anatomy.towers:
        _tower_usage(usage, tower, execution_device, load, ctx)
    if include_inputs and anatomy.input_embeddings is not None:
        device = execution_device(anatomy.input_embeddings)
        usage.setdefault(device, PhasePeaks()).inputs += _input_bytes(anatomy, load)
    return usage


def _decoder_usage(  # noqa: PLR0917 - private, called once
    usage: dict[str, PhasePeaks],
    decoder: Decoder,
    anatomy: Anatomy,
    execution_device: Callable[[str], str],
    load: Workload,
    ctx: _Context,
) -> None:
    """KV cache per device of the decoder's layers, their prefill, and the logits."""
    # The talker reads the thinker's prompt and reply; its own codec tokens are not modelled.
    tokens = load.prompt_tokens + (load.max_new_tokens if decoder.role == "talker" else 0)
    per_layer = decoder.kv_bytes_per_token(ctx.itemsize) * load.batch_size
    per_layer *= tokens + load.max_new_tokens
    layers: dict[str, int] = {}
    for layer in decoder.layers:
        device = execution_device(layer)
        layers[device] = layers.get(device, 0) + 1
    phase = "prefill" if decoder.role == "text" else "talker"
    for device, count in layers.items():
        peaks = usage.setdefault(device, PhasePeaks())
        peaks.kv_cache += count * per_layer
        peaks.add_phase(
            phase,
            _prefill(decoder, tokens, load, ctx, device),
            _prefill_fresh(decoder, tokens, load, ctx, device),
        )
    if decoder.role == "text" and anatomy.lm_head is not None:
        rows_out = load.batch_size * _logits_rows(anatomy, tokens)
        per_logit = ctx.itemsize + (_FP32 if anatomy.logits_upcast else 0)
        hidden_states = 2 * load.batch_size * tokens * decoder.hidden * ctx.itemsize
        peaks = usage.setdefault(execution_device(anatomy.lm_head), PhasePeaks())
        peaks.add_phase("logits", rows_out * decoder.vocab * per_logit + hidden_states)


def _copy_usage(
    usage: dict[str, PhasePeaks],
    anatomy: Anatomy,
    execution_device: Callable[[str], str],
    load: Workload,
    ctx: _Context,
) -> None:
    """The logits copied back to the input device when ``lm_head`` computes elsewhere.

    The root hook moves the outputs to the device of the inputs (accelerate's
    ``io_same_device``, omnifix's lean root hook), so such a split holds the logits twice.
    """
    decoder = anatomy.text
    if decoder is None or anatomy.lm_head is None or anatomy.input_embeddings is None:
        return
    device = execution_device(anatomy.input_embeddings)
    if execution_device(anatomy.lm_head) == device:
        return
    per_logit = _FP32 if anatomy.logits_upcast else ctx.itemsize
    rows = load.batch_size * _logits_rows(anatomy, load.prompt_tokens)
    copy = rows * decoder.vocab * per_logit
    usage.setdefault(device, PhasePeaks()).add_phase("logits copy", copy, ctx.fresh(device, copy))


def _tower_usage(
    usage: dict[str, PhasePeaks],
    tower: Tower,
    execution_device: Callable[[str], str],
    load: Workload,
    ctx: _Context,
) -> None:
    """The tower's calls, on every device that holds some of its blocks (no KV cache yet)."""
    if tower.kind == "vision":
        calls = _vision_calls(load)
    elif load.audio_seconds:
        calls = [("audio", *_audio_call(tower, load))]
    else:
        return
    for device in {execution_device(block) for block in tower.blocks}:
        peaks = usage.setdefault(device, PhasePeaks())
        for phase, positions, segment in calls:
            peak = _tower_call(tower, positions, segment, ctx, device)
            peaks.add_phase(phase, peak, _tower_fresh(tower, positions, segment, ctx, device))
