"""The memory model: each device's KV cache, inputs and per-phase peaks above the weights.

docs/planning.md explains it; :data:`CALIBRATION` holds its constants and their measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from omnifix._plan.scores import eager_score_bytes
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

    #: Hidden-size values per token at the MLP peak beside the ``mlp_buffers`` intermediate ones
    #: (residual, normed input, embeddings, rotary tables). Fitted: sdpa 8k-32k, 4.07-4.12.
    lm_mlp_hidden: float
    #: Hidden-size values per token around eager attention. Fitted: eager 8k, 6.2 (code: ~6.4).
    lm_attn_hidden: float
    #: Width-size values per patch at a vision block's peak (fp32 rotary q and k count double).
    #: Fitted: ViT sdpa, 1280 and 4096 image tokens, 17.4.
    vision_width: float
    #: The same for an audio encoder layer; not measured yet: code reading.
    audio_width: float
    #: Bytes per eager score in bf16 (or cpu fp16): the scores, softmax's fp32 copy and output.
    #: Used where the attention code cannot be probed (:mod:`omnifix._plan.scores`: code
    #: without ``eager_attention_forward``) and for sdpa with a score bias, whose math path
    #: upcasts likewise (FLAN-T5, transformers 5.17: 10.0 bytes per score measured on one H200).
    eager_score_bytes: int
    #: Bytes per score where the softmax needs no copy (fp32, or fp16 on CUDA's fused kernel).
    eager_score_bytes_fused: int
    #: cuBLAS/cuBLASLt workspaces of the first matmul on a GPU (the 2k case: 59 MiB above linear).
    workspace: int
    #: What a process holds on a GPU outside the caching allocator once ``generate`` has run:
    #: the CUDA context and the kernels loaded lazily on first use (``mem_get_info``'s used
    #: bytes less ``memory_reserved``). Fitted: the fit set's text and image runs held 701 and
    #: 719 MiB, each in a fresh process (Qwen2.5-VL-7B; H200, torch 2.11, transformers 5.17);
    #: their mean is taken, and :attr:`margin_bytes` holds the spread.
    cuda_context: int
    #: The part of :attr:`cuda_context` a process holds as soon as CUDA is initialised: measured
    #: 527 MiB in every fit-set process (one H200, torch 2.11). Free memory measured after that
    #: has paid it; the kernels loaded later (``cuda_context`` less this) are still to come.
    cuda_context_at_init: int
    #: What the CUDA caching allocator reserves beyond the allocated peak, as a share of it,
    #: with the default configuration. Fitted: ``reserved - allocated`` at the peak of
    #: ``generate`` measured 0.3 % to 5.0 % of allocated (median about 2 %; larger for long
    #: single prompts) on full-size random-weight 7B to 30B models, bf16, sdpa, text and image
    #: workloads, one H200, torch 2.11, transformers 5.17; the worst case is taken.
    reserved_gap: float
    #: The same with ``expandable_segments:True``, as a point estimate. Fitted: 0.63 % and
    #: 0.21 % of allocated on the fit set's text and image runs (tight budget, fresh processes);
    #: their mean is taken.
    reserved_gap_expandable: float
    #: The share the margin keeps room for with expandable segments: the worst measured on 7B
    #: to 30B models (0.3 % to 0.9 %), rounded up. The margin holds it less the point estimate.
    reserved_gap_expandable_worst: float
    #: Kept free on every GPU for the estimate's error: what a process holds outside the
    #: allocator varies by the kernels it loads (695 to 793 MiB after ``generate`` over 17 models
    #: and workloads, one H200, against the 710 MiB point estimate) ...
    margin_bytes: int
    #: ... plus this share of the predicted KV cache + activations (the model's error bound).
    margin_fraction: float
    #: Extra margin, a share of the activation peak, where eager attention runs (its fp32 softmax
    #: copy may stay reserved in unusable pieces). Measured: Qwen2.5-VL-7B eager, a 2560-token
    #: image on 24 GiB: 21.19 GiB allocated, then an OOM asking 6.25 GiB with 6.25 GiB reserved
    #: but unallocated (H200, torch 2.11).
    eager_block_fraction: float
    #: Fresh segments kept free above a phase's peak, in units of its largest transient block
    #: (an MLP intermediate, the input device's logits copy). Measured (H200, torch 2.11,
    #: transformers 5.17, benchmarks/accuracy.py): Qwen2.5-VL-7B text 32k on 2 x 15 GiB peaked
    #: within 0.1 % of the prediction, then asked 1.16 GiB (one 32768 x 18944 bf16 intermediate);
    #: the logits copies of Qwen2-Audio-7B (8k, 2.38 GiB) and the Omni-7B thinker (32k, 9.28 GiB)
    #: failed likewise; lm_head's own logits did not (within 2.2 GB of the peak).
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
    cuda_context=710 * MIB,
    cuda_context_at_init=527 * MIB,
    reserved_gap=0.05,
    reserved_gap_expandable=0.004,
    reserved_gap_expandable_worst=0.01,
    margin_bytes=80 * MIB,
    margin_fraction=0.05,
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
#: Bytes per input id, attention-mask entry and position id (int64), x3 for M-RoPE positions.
_INPUT_BYTES_PER_TOKEN: Final = 8 * 5
_FP32: Final = 4
#: The phases of the prompt's forward pass: they run with the prompt's KV cache alive.
_PROMPT_PHASES: Final = ("prefill", "logits", "logits copy")


@dataclass
class PhasePeaks:
    """One device's predicted use above its weights, per phase (bytes)."""

    #: The KV cache at the end of ``generate``: every layer's span of prompt and new tokens.
    kv_cache: int = 0
    #: The KV cache while the prompt's forward pass runs: the prompt's tokens in every layer.
    #: A sliding-window layer holds them all too: transformers' sliding-window cache layers keep
    #: a view of the whole prompt's keys and values until the first decode step replaces it.
    prefill_kv: int = 0
    #: What a decode step needs above the KV cache: the largest layer's cache once more (each
    #: step concatenates a new one before the old is freed) and one token's logits.
    decode_step: int = 0
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


def _vision_calls(tower: Tower, load: Workload) -> list[tuple[str, int, int]]:
    """``(phase, patches, segment)`` of each vision call: images, then videos."""
    calls = []
    merge = tower.patches_per_token
    if load.image_tokens:
        per_image = merge * load.image_tokens
        calls.append(("vision", load.batch_size * per_image, per_image))
    if load.video_tokens:
        frame = merge * max(1, load.video_tokens_per_second)
        calls.append(("video", load.batch_size * merge * load.video_tokens, frame))
    return calls


def _audio_call(tower: Tower, load: Workload) -> tuple[int, int]:
    """``(positions, segment)`` of the audio call."""
    if tower.layout == "batched":  # every clip padded to whole 30 s chunks
        chunks = math.ceil(load.audio_seconds / (tower.segment / _AUDIO_POSITIONS_PER_SECOND))
        return load.batch_size * chunks * tower.segment, tower.segment
    positions = load.batch_size * math.ceil(load.audio_seconds * _AUDIO_POSITIONS_PER_SECOND)
    return positions, max(1, tower.segment)


def _input_bytes(anatomy: Anatomy, load: Workload, itemsize: int) -> int:
    """Inputs as processors return them (fp32 pixels and features), alive through generate.

    With the feature maps a vision tower hands to the language model's first layers
    (Qwen3-VL's deepstack), kept through the prefill.
    """
    size = load.batch_size * load.prompt_tokens * _INPUT_BYTES_PER_TOKEN
    hidden = anatomy.text.hidden if anatomy.text is not None else 0
    for tower in anatomy.towers:
        if tower.kind == "vision":
            media = load.image_tokens + load.video_tokens
            patches = tower.patches_per_token * media
            size += load.batch_size * patches * tower.input_width * _FP32
            size += load.batch_size * media * tower.kept_features * hidden * itemsize
        elif load.audio_seconds:
            positions, _ = _audio_call(tower, load)
            frames = positions * _MEL_FRAMES_PER_SECOND // _AUDIO_POSITIONS_PER_SECOND
            size += frames * (tower.input_width * _FP32 + 8)
    return size


def _square(tower: Tower, patches: int, segment: int) -> int:
    """Scores per head of one tower call: one mask, padded clips in one batch, or a segment."""
    if tower.layout == "full_mask":
        return patches * patches
    if tower.layout == "batched":
        return (patches // segment) * segment * segment
    return segment * segment


@dataclass
class _Estimate:
    """One estimate in progress: the case, where each module runs, and the peaks so far."""

    anatomy: Anatomy
    runs_on: Callable[[str], str]
    load: Workload
    dtype: torch.dtype
    itemsize: int
    eager: bool
    cal: Calibration
    include_inputs: bool
    usage: dict[str, PhasePeaks] = field(default_factory=dict)

    def peaks(self, device: str) -> PhasePeaks:
        return self.usage.setdefault(device, PhasePeaks())

    def scores(self, device: str, part: Decoder | Tower) -> float:
        """Bytes per score: what ``part``'s own eager code holds (probed), else the constant.

        Only eager attention is probed; sdpa materialises scores only where a score bias forces
        its math path (T5), which upcasts to fp32 like the calibrated eager attention.
        """
        cuda = device.startswith("cuda")
        if self.eager:
            kv_heads = getattr(part, "kv_heads", part.heads)  # a tower's heads are all its own
            probed = eager_score_bytes(
                part.attention, self.dtype, cuda=cuda, heads=part.heads, kv_heads=kv_heads
            )
            if probed is not None:
                return probed
        return score_bytes(self.dtype, cuda=cuda, calibration=self.cal)

    def fresh(self, device: str, block: float, scores: float = 0) -> float:
        if not device.startswith("cuda"):  # only the CUDA caching allocator needs fresh blocks
            return 0
        return max(self.cal.fresh_blocks * block, self.cal.eager_fresh_blocks * scores)

    def tokens(self, decoder: Decoder) -> tuple[int, int]:
        """``(prompt, cross)``: the decoder's own prompt tokens and the positions it attends across.

        A text encoder (T5) reads the prompt and its decoder starts from one token; a decoder
        that attends to a tower's output (mllama's images, Whisper's audio) does not hold those
        media in its own prompt.
        """
        load = self.load
        if decoder.role == "talker":  # reads the thinker's prompt and reply (own codes unmodelled)
            return load.prompt_tokens + load.max_new_tokens, 0
        if decoder.role == "encoder":
            return load.prompt_tokens, 0
        if decoder.cross_source == "prompt":
            return 1, load.prompt_tokens
        if decoder.cross_source == "audio":
            positions = sum(
                _audio_call(t, load)[0] for t in self.anatomy.towers if t.kind == "audio"
            )
            return max(1, load.prompt_tokens - load.audio_tokens), positions // load.batch_size
        if decoder.cross_source == "vision":
            media = load.image_tokens + load.video_tokens
            return max(1, load.prompt_tokens - media), media
        return load.prompt_tokens, 0

    def kv_cache(self, decoder: Decoder, index: int, prompt: int, cross: int) -> int:
        """KV cache bytes of layer ``index`` at the end: its self-attention span and cross."""
        total = prompt + self.load.max_new_tokens
        window = decoder.window(index)
        span = total if window is None else min(window, total)
        return self._layer_kv(decoder, index, span, cross)

    def prefill_kv(self, decoder: Decoder, index: int, prompt: int, cross: int) -> int:
        """KV cache bytes of layer ``index`` at the end of the prefill (see PhasePeaks)."""
        span = 0 if decoder.window(index) == 0 else prompt  # 0: no self-attention
        return self._layer_kv(decoder, index, span, cross)

    def _layer_kv(self, decoder: Decoder, index: int, span: int, cross: int) -> int:
        """Bytes of ``span`` self-attention tokens of layer ``index``, and its cross positions."""
        if decoder.role == "encoder":
            return 0
        per_token = decoder.kv_bytes_per_token(self.itemsize) * self.load.batch_size
        return per_token * (span + (cross if decoder.keeps_cross(index) else 0))

    def moe(self, decoder: Decoder, rows: int) -> float:
        """Bytes of a sparse layer's MLP at its peak, beside the hidden-size buffers.

        The router's logits (model dtype) and fp32 probabilities, the top-k weights and indices;
        then, for fused experts, the grouped kernels' gathered rows (``rows x top_k``) with
        their up, gated and down projections; for per-expert modules, the int64 one-hot
        expert mask of the loop.
        """
        experts, b = decoder.experts, self.itemsize
        if experts is None:
            return 0
        router = rows * (experts.count * (b + _FP32) + experts.top_k * (_FP32 + 8))
        if experts.fused:
            gathered = rows * experts.top_k
            dispatch = gathered * (3 * decoder.hidden + 3 * experts.inner) * b + gathered * 16
        else:
            dispatch = rows * experts.top_k * experts.count * 8 + rows * decoder.hidden * b
        return router + dispatch

    def decoder(self, decoder: Decoder) -> None:
        """KV cache per device of the decoder's layers, their prefill, and the logits."""
        load, b, cal = self.load, self.itemsize, self.cal
        tokens, cross = self.tokens(decoder)
        rows = load.batch_size * tokens
        square = load.batch_size * tokens * max(tokens, cross)
        hidden = cal.lm_mlp_hidden * decoder.hidden
        dense = rows * b * (decoder.mlp_buffers * decoder.intermediate + hidden)
        sparse = rows * b * hidden + self.moe(decoder, rows)
        # Relative position biases (T5) are a score-sized tensor: scores are materialised.
        scores_kept = self.eager or decoder.score_bias
        by_device: dict[str, list[int]] = {}
        for index, layer in enumerate(decoder.layers):
            by_device.setdefault(self.runs_on(layer), []).append(index)
        phase = {"text": "prefill", "talker": "talker", "encoder": "encoder"}[decoder.role]
        for device, indices in by_device.items():
            attention = rows * b * cal.lm_attn_hidden * decoder.hidden
            softmax = 0
            if scores_kept:  # batch x heads x S^2 scores, and the batch x S^2 additive mask
                attention += square * (decoder.heads * self.scores(device, decoder) + b)
                softmax = load.batch_size * decoder.heads * tokens * max(tokens, cross) * _FP32
            if decoder.score_bias:  # the bias, computed once, kept for every layer
                per_sample = square // load.batch_size if decoder.batch_free_bias else square
                attention += per_sample * decoder.heads * b
            mlp = max((sparse if decoder.is_sparse(i) else dense for i in indices), default=dense)
            peaks = self.peaks(device)
            layer_kv = [self.kv_cache(decoder, i, tokens, cross) for i in indices]
            peaks.kv_cache += sum(layer_kv)
            if decoder.role == "text":
                peaks.prefill_kv += sum(self.prefill_kv(decoder, i, tokens, cross) for i in indices)
                peaks.decode_step = max(peaks.decode_step, *layer_kv)
            peaks.add_phase(
                phase,
                max(mlp, attention),
                self.fresh(device, rows * max(decoder.intermediate, 1) * b, softmax),
            )
        if decoder.role == "encoder":  # its output stays alive for the decoder's cross-attention
            self.peaks(self.runs_on(decoder.layers[-1])).inputs += rows * decoder.hidden * b
        if decoder.role == "text" and self.anatomy.lm_head is not None:
            rows_out = 1 if self.anatomy.last_token_logits else tokens
            logits = load.batch_size * rows_out * decoder.vocab
            upcast = _FP32 if self.anatomy.logits_upcast else 0
            hidden_states = 2 * load.batch_size * tokens * decoder.hidden * b
            head = self.peaks(self.runs_on(self.anatomy.lm_head))
            head.add_phase("logits", logits * (b + upcast) + hidden_states)
            # A decode step's logits, and generate's fp32 copy of them for its processors.
            head.decode_step += load.batch_size * decoder.vocab * (b + upcast + _FP32)

    def logits_copy(self) -> None:
        """The logits copied back to the input device when ``lm_head`` computes elsewhere.

        The root hook moves the outputs to the device of the inputs (accelerate's
        ``io_same_device``, omnifix's lean root hook), so such a split holds the logits twice.
        """
        anatomy, decoder = self.anatomy, self.anatomy.text
        if decoder is None or anatomy.lm_head is None or anatomy.input_embeddings is None:
            return
        device = self.runs_on(anatomy.input_embeddings)
        if self.runs_on(anatomy.lm_head) == device:
            return
        tokens = 1 if anatomy.last_token_logits else self.load.prompt_tokens
        rows = self.load.batch_size * tokens
        copy = rows * decoder.vocab * (_FP32 if anatomy.logits_upcast else self.itemsize)
        self.peaks(device).add_phase("logits copy", copy, self.fresh(device, copy))

    def tower(self, tower: Tower) -> None:
        """The tower's calls, on every device that holds some of its blocks (no KV cache yet)."""
        if tower.kind == "vision":
            calls = _vision_calls(tower, self.load)
        elif self.load.audio_seconds:
            calls = [("audio", *_audio_call(tower, self.load))]
        else:
            return
        b = self.itemsize
        width = self.cal.vision_width if tower.kind == "vision" else self.cal.audio_width
        per_position = max(
            width * tower.width, tower.mlp_buffers * tower.intermediate + 2 * tower.width
        )
        for device in {self.runs_on(block) for block in tower.blocks}:
            peaks = self.peaks(device)
            for phase, patches, segment in calls:
                linear = patches * b * per_position
                if tower.kind == "vision" and self.include_inputs:
                    linear += patches * tower.input_width * b  # fp32 pixel_values, cast
                square = _square(tower, patches, segment)
                # Flash kernels build no mask, so they would need less; they are modelled as
                # sdpa, the measured upper bound, until flash-attn can be measured.
                if tower.layout == "full_mask":  # a bool mask for 4.45's vision sdpa
                    mask = square * (1 if tower.kind == "vision" and not self.eager else b)
                    scores = tower.heads * square * self.scores(device, tower) if self.eager else 0
                    peak = linear + mask + scores
                elif not self.eager:
                    peak = linear
                elif tower.layout == "batched":  # padded clips in one batch, with their mask
                    peak = linear + square * (tower.heads * self.scores(device, tower) + b)
                else:  # one segment at a time
                    peak = linear + square * tower.heads * self.scores(device, tower)
                softmax = tower.heads * square * _FP32 if self.eager else 0
                mlp = patches * tower.intermediate * b
                peaks.add_phase(phase, peak, self.fresh(device, mlp, softmax))


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
    eager = attn_implementation == "eager"
    run = _Estimate(
        anatomy, execution_device, load, dtype, dtype.itemsize, eager, calibration, include_inputs
    )
    for decoder in anatomy.decoders:
        if decoder.role != "talker" or load.audio_output:
            run.decoder(decoder)
    run.logits_copy()
    for peaks in run.usage.values():
        for phase in _PROMPT_PHASES:
            if phase in peaks.phases:
                peaks.phases[phase] += peaks.prefill_kv
        if "talker" in peaks.phases:  # the thinker's reply decoded: its whole cache is alive
            peaks.phases["talker"] += peaks.kv_cache
        if peaks.kv_cache:  # the last decode step, with the whole cache
            peaks.add_phase("decode", peaks.kv_cache + peaks.decode_step)
    for tower in anatomy.towers:
        run.tower(tower)
    if include_inputs and anatomy.input_embeddings is not None:
        run.peaks(execution_device(anatomy.input_embeddings)).inputs += _input_bytes(
            anatomy, load, dtype.itemsize
        )
    return run.usage
