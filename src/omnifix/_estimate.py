"""The planner's memory model: what a workload adds on top of the weights, device by device.

Weights are sized by accelerate/transformers; this module predicts the rest of each device's peak
(``torch.cuda.max_memory_allocated``) for a given placement:

* **KV cache**: ``layers x 2 x kv_heads x head_dim x bytes x batch x (prompt + max_new_tokens)``,
  on the device of each layer (transformers keeps every layer's cache next to the layer:
  ``past_key_values`` is in ``_skip_keys_device_placement``, never moved).
* **Activations**, the transient peak of the phase that runs on the device, whichever is largest:

  - *language-model prefill* over all ``S`` prompt tokens (text + image + video + audio): a linear
    term per token, ``mlp_buffers x intermediate + lm_mlp_hidden x hidden`` model-dtype values
    at the MLP (``act(gate)``, ``up`` and their product are alive together in a gated MLP),
    or ``lm_attn_hidden x hidden`` around attention; **eager** attention adds
    ``batch x heads x S^2`` scores of ``eager_score_bytes`` each (bf16 scores, their fp32 copy and
    the fp32 softmax: 10 bytes; 8 for fp32 or CUDA fp16, whose softmax upcasts in the kernel)
    plus the ``batch x S^2`` additive mask; sdpa and flash attention materialise neither.
    Logits: one row per sample when the model's ``forward`` takes ``logits_to_keep``
    (``generate`` passes 1), else all ``S`` rows (Qwen2-Audio, the Omni thinker): ``S x vocab``.
  - *logits copy*, on a split where ``lm_head`` computes on another GPU than the input
    embeddings: the root hook (accelerate's ``io_same_device``, omnifix's lean one) copies the
    returned logits back to the input device at the end of the prefill, while that device holds
    its layers' KV cache (their activations are freed by then): KV cache + the logits again.
  - *vision tower* over ``P = 4 x`` (image or video tokens) patches (2x2 merge), images and videos
    in separate calls: a linear term per patch (fitted: the fp32 rotary copies of q and k dominate)
    and, for eager, ``heads x L^2`` scores per attention segment ``L``: one image, one temporal
    patch of a video (``cu_seqlens``), or the whole call where the installed transformers builds
    one block-diagonal mask over every patch (4.45 and the 4.49-4.5x vision towers).
  - *audio tower* at 50 positions per second (100 mel frames/s, conv stride 2; 25 LM tokens/s
    after pooling): Qwen2-Audio pads each 30 s chunk to 1500 positions and attends over them
    in one batch; Qwen2.5-Omni attends within ``n_window`` chunks (5.x) or through one
    block-diagonal mask over the whole clip (4.5x).

  A tower runs before the language model, while the KV cache is still empty, so a device's peak
  is ``max(kv + prefill, tower)``.
* **Fresh blocks**: per phase, the largest single transient block that the CUDA caching allocator
  may have to find as a new contiguous segment (see :class:`Calibration` ``fresh_blocks``); the
  planner keeps the highest phase peak + its blocks free (the margin), not only the peak.
* **Inputs** (ids, masks, fp32 ``pixel_values``/``input_features`` as processors return them)
  on the input device.

CUDA context, cuBLAS workspace and the safety margin are constants of :data:`CALIBRATION`,
applied by the planner. The coefficients were fitted to the measurements listed in
:data:`CALIBRATION` ``.figures``; re-fit them when new measurements land in
``benchmarks/results/peaks-*.json`` (``tests/test_plan.py`` checks every figure within 10 %).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch
    from torch import nn

    from omnifix._workload import Workload

__all__ = [
    "CALIBRATION",
    "Anatomy",
    "Calibration",
    "Decoder",
    "DeviceUsage",
    "Figure",
    "Tower",
    "describe",
    "estimate",
]

MIB: Final = 2**20
GIB: Final = 2**30


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


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
    #: The measuring run's first case: it also holds the one-time cuBLAS/cuBLASLt workspaces,
    #: which later cases find already allocated (inside their baseline).
    first_case: bool = False


@dataclass(frozen=True)
class Calibration:
    """Every fitted or assumed constant of the memory model, with the data behind it."""

    #: Hidden-size model-dtype values per token alive at the MLP peak besides the
    #: ``mlp_buffers`` intermediate-size ones (residual, normed input, the embeddings that
    #: ``forward`` keeps, rotary tables). Fitted: 8k/16k/32k sdpa give 4.07-4.12.
    lm_mlp_hidden: float
    #: Hidden-size values per token around eager attention (residual, normed, q, rotated q,
    #: k/v repeated to every head). Fitted to eager 8k (6.2); code reading gives ~6.4.
    lm_attn_hidden: float
    #: Width-size model-dtype values per patch at the vision block's peak; the fp32 rotary copies
    #: of q and k count double. Fitted to ViT sdpa 1280/4096 image tokens: 17.4.
    vision_width: float
    #: The same for an audio encoder layer. Not measured yet: from code reading (hidden, normed,
    #: q, k, v, attention output, projection, residual).
    audio_width: float
    #: Bytes per eager attention score in bf16 (or CPU fp16): bf16 scores, the fp32 copy
    #: ``softmax(dtype=float32)`` makes of them, and its fp32 output.
    eager_score_bytes: int
    #: Bytes per score where the softmax needs no copy (fp32, or fp16 on CUDA's fused kernel).
    eager_score_bytes_fused: int
    #: cuBLAS/cuBLASLt workspaces, allocated by the first matmul on each GPU (fitted: the 2k
    #: case, the run's first, is 59 MiB above the linear model).
    workspace: int
    #: What ``torch.cuda.mem_get_info`` loses when the CUDA context is created (not counted by
    #: ``max_memory_allocated``). Typical for torch 2.x on H100; ``measure_peaks.py`` records it.
    cuda_context: int
    #: Kept free on every device: allocator rounding and fragmentation (``memory_reserved`` above
    #: ``memory_allocated``) ...
    margin_bytes: int
    #: ... plus this share of the predicted KV cache + activations (the model's error bound).
    margin_fraction: float
    #: Extra margin, as a fraction of the activation peak, on devices that run eager attention.
    #: Its fp32 softmax copy (4 of every ~10 bytes per score) is one multi-GiB block; the caching
    #: allocator may hold that much reserved in pieces it cannot reuse and then need a fresh
    #: block. Measured: Qwen2.5-VL-7B, eager, a 2560-token image on a 24 GiB cap, predicted
    #: 21.99 GiB, allocated peak 21.19 GiB, then "6.25 GiB reserved but unallocated" and an OOM
    #: asking for 6.25 GiB more (H200, torch 2.11).
    eager_block_fraction: float
    #: Fresh blocks kept free above a phase's peak, in units of the largest single transient
    #: block the phase allocates: a decoder or tower layer's MLP intermediate (``rows x
    #: intermediate x itemsize``) and the input device's logits copy. The caching allocator
    #: serves such a block from a cached segment only when one is free in one piece; the cached
    #: ones of the previous layers are split by smaller tensors (the KV cache among them), so it
    #: needs a fresh segment on top of the allocated peak. Measured (H200, torch 2.11,
    #: transformers 5.17, ``benchmarks/accuracy.py``): Qwen2.5-VL-7B, text 32k, sdpa, split on
    #: 2 x 15 GiB: cuda:0's allocated peak within 0.1 % of the prediction, then an OOM asking for
    #: 1.16 GiB (one 32768 x 18944 bf16 MLP intermediate) with 0.4 GiB reserved above allocated.
    #: The logits copy (Qwen2-Audio-7B text 8k on 2 x 15 GiB, 2.38 GiB; the Omni-7B thinker text
    #: 32k on 2 x 19 GiB, 9.28 GiB) failed with ~1.1 GB of cache that could not be released; it
    #: counts as one block until measured. The lm_head's own logits get none: the thinker's
    #: 9.28 GiB ones were allocated on cuda:1 within 2.2 GB of its predicted peak.
    fresh_blocks: int
    #: The same for eager attention's fp32 softmax output (``batch x heads x L^2 x 4`` bytes, the
    #: largest block of an eager layer): two blocks, i.e. on a device that runs eager attention
    #: the margin keeps ``max(eager_block_fraction x activations, eager_fresh_blocks x block)``.
    #: Measured: Qwen2.5-VL-7B, text 8k, eager, split on 2 x 37 GiB: cuda:0's allocated peak within
    #: 0.3 % of the prediction, then an OOM asking for 7.00 GiB (28 x 8192^2 x 4 B) while 7 GiB
    #: was reserved but unusable: the need was the allocated peak + 2 blocks (the 2560-token image
    #: above: the same, 6.25 GiB blocks).
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

#: Audio-encoder positions per second (before the pooling).
_AUDIO_POSITIONS_PER_SECOND: Final = 50
_MEL_FRAMES_PER_SECOND: Final = 100
#: Patches per merged vision token (2x2 spatial merge).
_PATCHES_PER_TOKEN: Final = 4
#: Bytes per input id, attention-mask entry and position id (int64), x3 for M-RoPE positions.
_INPUT_BYTES_PER_TOKEN: Final = 8 * 5
_FP32: Final = 4
_FIRST_UNCAST_LOGITS: Final = (4, 46)  # 4.45 returned logits upcast to fp32 from every forward


# --------------------------------------------------------------------------------------------
# Anatomy: the parts of a model the memory model needs, found on its (meta) skeleton
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoder:
    """A stack of transformer decoder layers with a KV cache."""

    role: Literal["text", "talker"]
    layers: tuple[str, ...]
    hidden: int
    intermediate: int
    mlp_buffers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """KV cache bytes of one layer per token and sample."""
        return 2 * self.kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class Tower:
    """A vision or audio encoder that runs before the language model."""

    kind: Literal["vision", "audio"]
    name: str
    blocks: tuple[str, ...]
    width: int
    intermediate: int
    mlp_buffers: int
    heads: int
    #: How attention is cut into segments: ``"chunked"`` (one segment at a time,
    #: ``cu_seqlens``), ``"full_mask"`` (one block-diagonal mask over the whole call),
    #: ``"batched"`` (padded chunks attended in one batch, Qwen2-Audio).
    layout: Literal["chunked", "full_mask", "batched"]
    #: Values per patch in ``pixel_values`` (3 x temporal_patch x patch^2), or mel bins.
    input_width: int
    #: Audio: positions per attention segment (``n_window`` or ``max_source_positions``).
    segment: int = 0


@dataclass(frozen=True)
class Anatomy:
    """What :func:`estimate` needs to know about a model."""

    decoders: tuple[Decoder, ...]
    towers: tuple[Tower, ...]
    input_embeddings: str | None
    lm_head: str | None
    #: ``generate`` computes logits for the last token only (``forward`` takes
    #: ``logits_to_keep``); else for every prompt token.
    last_token_logits: bool
    #: Logits come back in fp32 on top of the model-dtype ones (transformers 4.45).
    logits_upcast: bool

    @property
    def text(self) -> Decoder | None:
        """The main language model (the thinker's for Qwen2.5-Omni)."""
        return next((d for d in self.decoders if d.role == "text"), None)


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _matrices(module: nn.Module) -> Iterator[tuple[int, ...]]:
    for param in module.parameters():
        if param.dim() == 2:  # noqa: PLR2004 - a weight matrix
            yield tuple(param.shape)


def _intermediate(block: nn.Module, config: Any, width: int) -> tuple[int, int]:
    """The MLP's inner width and how many inner-width buffers its peak holds (3 gated, 2 not)."""
    inner = _config_int(config, "intermediate_size", "encoder_ffn_dim", "n_inner")
    if inner is None:
        ratio = getattr(config, "mlp_ratio", None)
        inner = int(width * ratio) if isinstance(ratio, (int, float)) else None
    shapes = list(_matrices(block))
    if inner is None:  # e.g. GPT-2: the widest matrix of the block
        inner = max((max(shape) for shape in shapes), default=4 * width)
    uses = sum(1 for shape in shapes if inner in shape and width in shape)
    # gate + up + down -> act(gate), up, product; fc1 + fc2 -> fc1 output, activation.
    return inner, max(2, min(uses, 3))


def _attention_module(block: nn.Module) -> nn.Module | None:
    for name in ("attn", "self_attn", "attention"):
        module = getattr(block, name, None)
        if module is not None:
            return module  # type: ignore[no-any-return]
    return None


def attention_layout(attention: nn.Module | None) -> Literal["chunked", "full_mask"]:
    """How a tower's attention cuts its call: one segment at a time, or one block-diagonal mask.

    Packed attention (a ``forward`` that takes ``cu_seqlens``) runs segment by segment where
    the installed transformers splits packed sequences and the forward takes no
    ``attention_mask``; otherwise it builds one mask over the whole call. Attention that is not
    packed runs per image or clip.
    """
    from omnifix._compat import PACKED_ATTENTION_SPLITS, transformers_at_least

    if attention is None:
        return "chunked"
    parameters = inspect.signature(type(attention).forward).parameters
    if "cu_seqlens" not in parameters:
        return "chunked"
    splits = transformers_at_least(PACKED_ATTENTION_SPLITS) and "attention_mask" not in parameters
    return "chunked" if splits else "full_mask"


def _tower(kind: Literal["vision", "audio"], name: str, owner: nn.Module, blocks: Any) -> Tower:
    config = owner.config
    first = blocks[0]
    width = _config_int(config, "embed_dim", "d_model") or _config_int(config, "hidden_size") or 0
    heads = _config_int(config, "num_heads", "encoder_attention_heads", "num_attention_heads") or 1
    inner, buffers = _intermediate(first, config, width)
    layout: Literal["chunked", "full_mask", "batched"] = attention_layout(_attention_module(first))
    segment = 0
    if kind == "vision":
        patch = _config_int(config, "patch_size") or 14
        temporal = _config_int(config, "temporal_patch_size") or 1
        channels = _config_int(config, "in_channels", "in_chans", "num_channels") or 3
        input_width = channels * temporal * patch * patch
    else:
        input_width = _config_int(config, "num_mel_bins") or 128
        window = _config_int(config, "n_window")
        if window is None:  # Whisper-style: every clip padded to max_source_positions
            layout, segment = "batched", _config_int(config, "max_source_positions") or 1500
        else:
            segment = window
    blocks_names = tuple(f"{name}.{i}" for i in range(len(blocks)))
    return Tower(
        kind, name, blocks_names, width, inner, buffers, heads, layout, input_width, segment
    )


def _decoder(name: str, owner: nn.Module, blocks: Any) -> Decoder:
    config = owner.config
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    heads = _config_int(config, "num_attention_heads", "n_head") or 1
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    head_dim = _config_int(config, "head_dim") or hidden // heads
    inner, buffers = _intermediate(blocks[0], config, hidden)
    return Decoder(
        "talker" if "talker" in name.split(".", maxsplit=1)[0] else "text",
        tuple(f"{name}.{i}" for i in range(len(blocks))),
        hidden,
        inner,
        buffers,
        heads,
        kv_heads,
        head_dim,
        _config_int(config, "vocab_size") or 0,
    )


def _block_lists(model: nn.Module) -> Iterator[tuple[str, nn.Module, Any]]:
    """``(name, owner, list)`` of every stack of identical blocks that its owner's config counts.

    Counted by ``num_hidden_layers``, ``depth`` or ``encoder_layers``.
    """
    from torch import nn

    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        config = getattr(owner, "config", None)
        if config is None:
            continue
        if len(module) == _config_int(config, "num_hidden_layers", "depth", "encoder_layers"):
            yield name, owner, module


def _generating_class(model: nn.Module) -> type:
    # Qwen2.5-Omni's generate() runs the thinker's generate(), whose forward makes the logits.
    thinker = getattr(model, "thinker", None)
    return type(thinker) if thinker is not None else type(model)


def _transformers_release() -> tuple[int, ...]:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release


def describe(model: nn.Module) -> Anatomy:
    """Find the decoders, towers, embeddings and lm_head of ``model`` (built on ``meta``).

    Decoders and towers are the stacks of blocks that their owner's config counts: vision when
    the config has ``patch_size``, audio when it has ``num_mel_bins``, a decoder when it has
    ``vocab_size`` (the talker when it sits under ``talker``). Other stacks (Omni's token2wav)
    count for their weights only.
    """
    from torch import nn

    decoders: list[Decoder] = []
    towers: list[Tower] = []
    for name, owner, blocks in _block_lists(model):
        config = owner.config
        if hasattr(config, "patch_size"):
            towers.append(_tower("vision", name, owner, blocks))
        elif hasattr(config, "num_mel_bins"):
            towers.append(_tower("audio", name, owner, blocks))
        elif _config_int(config, "vocab_size"):
            decoders.append(_decoder(name, owner, blocks))
    from omnifix._modules import find_input_embeddings

    text = next((d for d in decoders if d.role == "text"), None)
    embeddings = find_input_embeddings(model)
    input_name = embeddings[0][0] if embeddings else None
    lm_head = None
    if text is not None:
        heads = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.out_features == text.vocab and "talker" not in n
        ]
        lm_head = next((n for n in heads if n.endswith("lm_head")), heads[-1] if heads else None)
    parameters = inspect.signature(getattr(_generating_class(model), "forward")).parameters  # noqa: B009
    return Anatomy(
        tuple(decoders),
        tuple(towers),
        input_name,
        lm_head,
        last_token_logits=bool({"logits_to_keep", "num_logits_to_keep"} & set(parameters)),
        logits_upcast=_transformers_release()[:2] < _FIRST_UNCAST_LOGITS,
    )


# --------------------------------------------------------------------------------------------
# Estimation
# --------------------------------------------------------------------------------------------


@dataclass
class DeviceUsage:
    """One device's predicted use above its weights, per phase (bytes)."""

    weights: int = 0
    kv_cache: int = 0
    inputs: int = 0
    #: Peak above weights + inputs during each phase that runs here (KV cache included where
    #: it is alive: prefill, talker).
    phases: dict[str, int] = field(default_factory=dict)
    #: Fresh memory each phase may need above its peak: its largest transient block times the
    #: blocks :class:`Calibration` keeps free for it (GPU phases only; empty on the cpu).
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
        peak = max(self.phases.values(), default=0)
        return max(0, peak - self.kv_cache) + self.inputs


def score_bytes(dtype: torch.dtype, *, cuda: bool, calibration: Calibration) -> int:
    """Bytes per eager attention score (see :class:`Calibration`)."""
    import torch

    if dtype == torch.float32 or (cuda and dtype == torch.float16):
        return calibration.eager_score_bytes_fused
    return calibration.eager_score_bytes


@dataclass(frozen=True)
class _Context:
    dtype: torch.dtype
    itemsize: int
    attn: str
    calibration: Calibration
    include_inputs: bool

    @property
    def eager(self) -> bool:
        return self.attn == "eager"

    def scores(self, device: str) -> int:
        return score_bytes(self.dtype, cuda=device.startswith("cuda"), calibration=self.calibration)

    def fresh(self, device: str, block: float, scores: float = 0) -> float:
        """Fresh memory for a phase whose largest blocks are ``block`` and fp32 ``scores``.

        Only the CUDA caching allocator needs it.
        """
        if not device.startswith("cuda"):
            return 0
        cal = self.calibration
        return max(cal.fresh_blocks * block, cal.eager_fresh_blocks * scores)


def _prefill(decoder: Decoder, tokens: int, load: Workload, ctx: _Context, device: str) -> float:
    """Peak of one decoder layer's forward over ``tokens`` prompt tokens (KV cache excluded)."""
    cal, b = ctx.calibration, ctx.itemsize
    rows = load.batch_size * tokens
    mlp = (
        rows * b * (decoder.mlp_buffers * decoder.intermediate + cal.lm_mlp_hidden * decoder.hidden)
    )
    attention = rows * b * cal.lm_attn_hidden * decoder.hidden
    if ctx.eager:
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


def _logits(
    decoder: Decoder, tokens: int, load: Workload, anatomy: Anatomy, ctx: _Context
) -> float:
    rows = 1 if anatomy.last_token_logits else tokens
    per_logit = ctx.itemsize + (_FP32 if anatomy.logits_upcast else 0)
    hidden_states = 2 * load.batch_size * tokens * decoder.hidden * ctx.itemsize
    return load.batch_size * rows * decoder.vocab * per_logit + hidden_states


def _logits_copy(
    decoder: Decoder, tokens: int, load: Workload, anatomy: Anatomy, ctx: _Context
) -> int:
    """The returned logits (fp32 where transformers upcasts them), copied to the input device."""
    rows = 1 if anatomy.last_token_logits else tokens
    per_logit = _FP32 if anatomy.logits_upcast else ctx.itemsize
    return load.batch_size * rows * decoder.vocab * per_logit


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
    # Flash kernels take ``cu_seqlens`` and build no mask, so they would need less than this.
    # They are modelled as sdpa on purpose: no flash-attn build could be measured on our GPUs
    # (docs/benchmarks.md), and sdpa's figure is the measured upper bound.
    if tower.layout == "full_mask":
        # One block-diagonal mask over the whole call: a bool mask for the 4.45 vision sdpa,
        # the model dtype otherwise.
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
        chunk_seconds = tower.segment / _AUDIO_POSITIONS_PER_SECOND
        chunks = math.ceil(load.audio_seconds / chunk_seconds)
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
) -> dict[str, DeviceUsage]:
    """KV cache, inputs and per-phase activation peaks on each device that computes.

    Args:
        anatomy: From :func:`describe`.
        execution_device: Where the module of a given name computes (offloaded modules compute
            on the main GPU).
        load: The workload.
        dtype: Dtype of the activations and the KV cache.
        attn_implementation: ``"eager"`` materialises attention scores; sdpa and any other
            (flash kernels included, which are modelled as sdpa) build the masks the model's
            code builds.
        calibration: The constants.
        include_inputs: Count the input tensors (the calibration figures exclude them).

    Returns:
        ``{device key: usage}``; weights are left at 0 (the planner sizes them).
    """
    import torch

    ctx = _Context(
        dtype,
        torch.empty((), dtype=dtype, device="meta").element_size(),
        attn_implementation,
        calibration,
        include_inputs,
    )
    usage: dict[str, DeviceUsage] = {}
    for decoder in anatomy.decoders:
        if decoder.role == "text" or load.audio_output:
            _decoder_usage(usage, decoder, anatomy, execution_device, load, ctx)
    _copy_usage(usage, anatomy, execution_device, load, ctx)
    for device_usage in usage.values():
        # Language-model phases run with the whole KV cache of the device alive.
        for phase in ("prefill", "talker", "logits", "logits copy"):
            if phase in device_usage.phases:
                device_usage.phases[phase] += device_usage.kv_cache
    for tower in anatomy.towers:
        _tower_usage(usage, tower, execution_device, load, ctx)
    if include_inputs and anatomy.input_embeddings is not None:
        device = execution_device(anatomy.input_embeddings)
        usage.setdefault(device, DeviceUsage()).inputs += _input_bytes(anatomy, load)
    return usage


def _decoder_usage(  # noqa: PLR0917 - private, called once
    usage: dict[str, DeviceUsage],
    decoder: Decoder,
    anatomy: Anatomy,
    execution_device: Callable[[str], str],
    load: Workload,
    ctx: _Context,
) -> None:
    """KV cache per device of the decoder's layers, their prefill, and the logits."""
    # The talker reads the thinker's prompt and reply; its own codec tokens are not modelled.
    tokens = load.prompt_tokens + (load.max_new_tokens if decoder.role == "talker" else 0)
    per_layer = (
        decoder.kv_bytes_per_token(ctx.itemsize) * load.batch_size * (tokens + load.max_new_tokens)
    )
    layers: dict[str, int] = {}
    for layer in decoder.layers:
        device = execution_device(layer)
        layers[device] = layers.get(device, 0) + 1
    phase = "prefill" if decoder.role == "text" else "talker"
    for device, count in layers.items():
        device_usage = usage.setdefault(device, DeviceUsage())
        device_usage.kv_cache += count * per_layer
        device_usage.add_phase(
            phase,
            _prefill(decoder, tokens, load, ctx, device),
            _prefill_fresh(decoder, tokens, load, ctx, device),
        )
    if decoder.role == "text" and anatomy.lm_head is not None:
        device_usage = usage.setdefault(execution_device(anatomy.lm_head), DeviceUsage())
        device_usage.add_phase("logits", _logits(decoder, tokens, load, anatomy, ctx))


def _copy_usage(
    usage: dict[str, DeviceUsage],
    anatomy: Anatomy,
    execution_device: Callable[[str], str],
    load: Workload,
    ctx: _Context,
) -> None:
    """The logits copied back to the input device when ``lm_head`` computes elsewhere.

    The model's root hook moves the top-level outputs to the device of the inputs (accelerate's
    ``io_same_device``; omnifix's lean root hook does the same), so a split whose ``lm_head`` is
    not on the input-embedding device holds the logits twice: there and on the input device.
    """
    decoder = anatomy.text
    if decoder is None or anatomy.lm_head is None or anatomy.input_embeddings is None:
        return
    device = execution_device(anatomy.input_embeddings)
    if execution_device(anatomy.lm_head) == device:
        return
    copy = _logits_copy(decoder, load.prompt_tokens, load, anatomy, ctx)
    usage.setdefault(device, DeviceUsage()).add_phase("logits copy", copy, ctx.fresh(device, copy))


def _tower_usage(
    usage: dict[str, DeviceUsage],
    tower: Tower,
    execution_device: Callable[[str], str],
    load: Workload,
    ctx: _Context,
) -> None:
    """The tower's calls, on every device that holds some of its blocks."""
    if tower.kind == "vision":
        calls = _vision_calls(load)
    elif load.audio_seconds:
        calls = [("audio", *_audio_call(tower, load))]
    else:
        return
    for device in {execution_device(block) for block in tower.blocks}:
        device_usage = usage.setdefault(device, DeviceUsage())
        for phase, positions, segment in calls:
            device_usage.add_phase(
                phase,
                _tower_call(tower, positions, segment, ctx, device),
                _tower_fresh(tower, positions, segment, ctx, device),
            )
