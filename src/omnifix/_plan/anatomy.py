"""The parts of a model the memory model needs: decoders, towers, embeddings, lm_head.

Found on the ``meta`` skeleton: stacks of identical blocks that their owner's config counts,
their widths from those configs, their attention layout from the installed code's signatures.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from omnifix._compat import PACKED_ATTENTION_SPLITS, UNCAST_LOGITS, transformers_at_least
from omnifix._modules import find_input_embeddings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import nn

__all__ = ["Anatomy", "Decoder", "Layout", "Tower", "attention_layout", "describe"]

#: How a tower's attention is cut: ``"chunked"`` (one segment at a time), ``"full_mask"`` (one
#: block-diagonal mask over the whole call), ``"batched"`` (padded clips in one batch).
Layout = Literal["chunked", "full_mask", "batched"]


@dataclass(frozen=True)
class Decoder:
    """A stack of transformer decoder layers with a KV cache."""

    role: Literal["text", "talker"]
    layers: tuple[str, ...]
    hidden: int
    intermediate: int
    #: Intermediate-size buffers alive at the MLP's peak: 3 for a gated MLP, 2 otherwise.
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
    layout: Layout
    #: Values per patch in ``pixel_values`` (3 x temporal_patch x patch^2), or mel bins.
    input_width: int
    #: Audio: positions per attention segment (``n_window`` or ``max_source_positions``).
    segment: int = 0


@dataclass(frozen=True)
class Anatomy:
    """What :func:`omnifix._plan.estimate.estimate` needs to know about a model."""

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


def _intermediate(block: nn.Module, config: Any, width: int) -> tuple[int, int]:
    """The MLP's inner width and how many inner-width buffers its peak holds (3 gated, 2 not)."""
    inner = _config_int(config, "intermediate_size", "encoder_ffn_dim", "n_inner")
    if inner is None:
        ratio = getattr(config, "mlp_ratio", None)
        inner = int(width * ratio) if isinstance(ratio, (int, float)) else None
    shapes = [tuple(p.shape) for p in block.parameters() if p.dim() == 2]  # noqa: PLR2004
    if inner is None:  # e.g. GPT-2: the widest matrix of the block
        inner = max((max(shape) for shape in shapes), default=4 * width)
    uses = sum(1 for shape in shapes if inner in shape and width in shape)
    # gate + up + down -> act(gate), up, product; fc1 + fc2 -> fc1 output, activation.
    return inner, max(2, min(uses, 3))


def _attention_module(block: nn.Module) -> nn.Module | None:
    found = (getattr(block, name, None) for name in ("attn", "self_attn", "attention"))
    return next((module for module in found if module is not None), None)


def attention_layout(attention: nn.Module | None) -> Layout:
    """``"chunked"``, or ``"full_mask"`` where packed attention builds one mask over the call.

    Packed attention (its ``forward`` takes ``cu_seqlens``) runs one segment at a time where the
    installed transformers splits packed sequences and ``forward`` takes no ``attention_mask``.
    """
    if attention is None:
        return "chunked"
    parameters = inspect.signature(type(attention).forward).parameters
    if "cu_seqlens" not in parameters:
        return "chunked"
    splits = transformers_at_least(PACKED_ATTENTION_SPLITS) and "attention_mask" not in parameters
    return "chunked" if splits else "full_mask"


def _tower(kind: Literal["vision", "audio"], name: str, owner: nn.Module, blocks: Any) -> Tower:
    config = owner.config
    width = _config_int(config, "embed_dim", "d_model") or _config_int(config, "hidden_size") or 0
    heads = _config_int(config, "num_heads", "encoder_attention_heads", "num_attention_heads") or 1
    inner, buffers = _intermediate(blocks[0], config, width)
    layout = attention_layout(_attention_module(blocks[0]))
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
    names = tuple(f"{name}.{i}" for i in range(len(blocks)))
    return Tower(kind, name, names, width, inner, buffers, heads, layout, input_width, segment)


def _decoder(name: str, owner: nn.Module, blocks: Any) -> Decoder:
    config = owner.config
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    heads = _config_int(config, "num_attention_heads", "n_head") or 1
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    inner, buffers = _intermediate(blocks[0], config, hidden)
    role: Literal["text", "talker"] = "talker" if "talker" in name.partition(".")[0] else "text"
    layers = tuple(f"{name}.{i}" for i in range(len(blocks)))
    head_dim = _config_int(config, "head_dim") or hidden // heads
    vocab = _config_int(config, "vocab_size") or 0
    return Decoder(role, layers, hidden, inner, buffers, heads, kv_heads, head_dim, vocab)


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


def describe(model: nn.Module) -> Anatomy:
    """Find the decoders, towers, embeddings and lm_head of ``model`` (built on ``meta``).

    A stack is a vision tower when its config has ``patch_size``, an audio tower with
    ``num_mel_bins``, a decoder with ``vocab_size`` (the talker under ``talker``); other stacks
    (Omni's token2wav) count for their weights only.

    Example:
        >>> from omnifix._plan.anatomy import describe
        >>> from omnifix._plan.skeleton import build_skeleton
        >>> anatomy = describe(build_skeleton("qwen2-vl-7b"))
        >>> len(anatomy.text.layers), [tower.kind for tower in anatomy.towers], anatomy.lm_head
        (28, ['vision'], 'lm_head')
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
    text = next((d for d in decoders if d.role == "text"), None)
    embeddings = find_input_embeddings(model)
    lm_head = None
    if text is not None:
        heads = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.out_features == text.vocab and "talker" not in n
        ]
        lm_head = next((n for n in heads if n.endswith("lm_head")), heads[-1] if heads else None)
    # Qwen2.5-Omni's generate() runs the thinker's, whose forward makes the logits.
    thinker = getattr(model, "thinker", None)
    generating = type(model if thinker is None else thinker)
    parameters = inspect.signature(generating.forward).parameters
    return Anatomy(
        tuple(decoders),
        tuple(towers),
        embeddings[0][0] if embeddings else None,
        lm_head,
        last_token_logits=bool({"logits_to_keep", "num_logits_to_keep"} & set(parameters)),
        logits_upcast=not transformers_at_least(UNCAST_LOGITS),
    )
