"""The parts of a model the memory model needs: decoders, encoders, towers, embeddings, lm_head.

Found on the ``meta`` skeleton: stacks of blocks that their owner's config counts, their widths
from those configs, each layer's attention kind from the config's documented fields
(``layer_types``, ``sliding_window``, ``cross_attention_layers``) and the module tree (a
cross-attention module, a mixture of experts), encoder and decoder from ``get_encoder()`` and
``get_decoder()``, and the towers' attention layout from the installed code's signatures. What is
not understood is listed in :attr:`Anatomy.unknown`, never silently left out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal

from omnifix._compat import (
    PACKED_ATTENTION_SPLITS,
    SLIDING_WINDOW_CACHE,
    UNCAST_LOGITS,
    transformers_at_least,
)
from omnifix._modules import find_input_embeddings
from omnifix._plan.scores import takes_position_bias

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import nn

__all__ = ["Anatomy", "Decoder", "Experts", "Layout", "Tower", "attention_layout", "describe"]

#: How a tower's attention is cut: ``"chunked"`` (one segment at a time), ``"full_mask"`` (one
#: block-diagonal mask over the whole call), ``"batched"`` (padded clips in one batch).
Layout = Literal["chunked", "full_mask", "batched"]
#: What a decoder's cross-attention layers attend to: a text encoder's output (one position per
#: prompt token), the vision tower's output or the audio encoder's; ``""``: no cross-attention.
CrossSource = Literal["", "prompt", "vision", "audio"]
#: Self-attention kinds of ``layer_types`` the memory model sizes (others are listed as unknown).
_FULL: Final = frozenset({"full_attention", "global_attention", "attention"})
_WINDOWED: Final = frozenset({"sliding_attention", "chunked_attention", "local_attention"})
#: Child modules that attend to another sequence (decoder of an encoder-decoder, mllama).
_CROSS_NAMES: Final = ("cross_attn", "encoder_attn", "crossattention", "EncDecAttention")
_SELF_NAMES: Final = ("self_attn", "attn", "attention", "SelfAttention", "self_attention")


@dataclass(frozen=True)
class Experts:
    """The mixture of experts of a decoder's sparse layers."""

    count: int
    top_k: int
    #: The inner width of one expert's MLP.
    inner: int
    #: Expert weights held as 3-D tensors (transformers 5): its grouped kernels gather each
    #: token's ``top_k`` rows at once. Else one module per expert, looped over.
    fused: bool


@dataclass(frozen=True)
class Decoder:
    """A stack of transformer layers; with a KV cache unless it is an encoder (T5's)."""

    role: Literal["text", "talker", "encoder"]
    layers: tuple[str, ...]
    hidden: int
    intermediate: int
    #: Intermediate-size buffers alive at the MLP's peak: 3 for a gated MLP, 2 otherwise.
    mlp_buffers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    #: Self-attention span per layer: ``None`` every token, ``W`` the last W tokens (a sliding
    #: window the installed cache honours), ``0`` none (a cross-attention-only layer).
    windows: tuple[int | None, ...] = ()
    #: Per layer: whether it keeps cross-attention KV of :attr:`cross_source`'s positions.
    cross: tuple[bool, ...] = ()
    cross_source: CrossSource = ""
    experts: Experts | None = None
    #: Per layer: whether its MLP is the mixture of :attr:`experts`.
    sparse: tuple[bool, ...] = ()
    #: Attention adds a learned relative position bias (T5): scores are materialised.
    score_bias: bool = False
    #: The bias is computed once per pass without the batch dimension and added inside each
    #: attention call (T5 on transformers 5); else it carries the mask, ``batch x heads x L^2``.
    batch_free_bias: bool = False
    #: One of the layers' self-attention modules (on ``meta``): its eager code is probed for
    #: the bytes each score costs (:mod:`omnifix._plan.scores`).
    attention: nn.Module | None = field(default=None, compare=False, repr=False)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """KV cache bytes of one layer per token and sample."""
        return 2 * self.kv_heads * self.head_dim * itemsize

    def window(self, index: int) -> int | None:
        """The self-attention span of layer ``index`` (see :attr:`windows`)."""
        return self.windows[index] if index < len(self.windows) else None

    def keeps_cross(self, index: int) -> bool:
        """Whether layer ``index`` keeps cross-attention KV."""
        return index < len(self.cross) and self.cross[index]

    def is_sparse(self, index: int) -> bool:
        """Whether layer ``index`` runs the mixture of experts."""
        return index < len(self.sparse) and self.sparse[index]


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
    #: Patches per language-model token (``spatial_merge_size`` squared; Gemma 3: the patches
    #: of an image over its ``mm_tokens_per_image``).
    patches_per_token: int = 4
    #: Feature maps of intermediate blocks handed to the language model and kept through its
    #: prefill (Qwen3-VL's deepstack: ``deepstack_visual_indexes``), and their width.
    kept_features: int = 0
    #: One block's attention module (on ``meta``), probed like :attr:`Decoder.attention`.
    attention: nn.Module | None = field(default=None, compare=False, repr=False)


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
    #: What the memory model does not understand, each with the conservative bound it uses
    #: instead (the plan's notes; ``plan_placement`` refuses a fit on a bound unless accepted).
    unknown: tuple[str, ...] = ()

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
    inner = _config_int(config, "intermediate_size", "encoder_ffn_dim", "d_ff", "n_inner")
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
    kept = getattr(config, "deepstack_visual_indexes", None)
    return Tower(
        kind,
        name,
        names,
        width,
        inner,
        buffers,
        heads,
        layout,
        input_width,
        segment,
        patches_per_token=(_config_int(config, "spatial_merge_size") or 1) ** 2,
        kept_features=len(kept) if isinstance(kept, (list, tuple)) else 0,
        attention=_attention_module(blocks[0]) or _child(blocks[0], _SELF_NAMES),
    )


def _windows(config: Any, count: int, unknown: list[str], name: str) -> tuple[int | None, ...]:
    """Each layer's self-attention span, from ``layer_types`` and ``sliding_window``.

    A sliding window counts only where the installed ``generate`` cache keeps just the window;
    a layer kind the model does not size is counted as full attention (the bound) and listed.
    """
    window = _config_int(config, "sliding_window", "attention_chunk_size")
    honoured = window is not None and transformers_at_least(SLIDING_WINDOW_CACHE)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == count:
        spans = tuple(
            (window if honoured else None) if kind in _WINDOWED else None for kind in types
        )
        for kind in sorted({str(k) for k in types} - _WINDOWED - _FULL):
            layers = sum(1 for k in types if k == kind)
            unknown.append(
                f"{name}: {layers} layers of kind {kind!r} are sized as full-attention layers "
                "(a KV cache of every token); a fixed-size state larger than that (short "
                "prompts) is not counted"
            )
        return spans
    sliding = honoured and getattr(config, "use_sliding_window", True) is not False
    return tuple(window if sliding else None for _ in range(count))


def _has_child(block: nn.Module, names: tuple[str, ...]) -> bool:
    return _child(block, names) is not None


def _child(block: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The first module under ``block`` whose own name is one of ``names``."""
    found = (m for child, m in block.named_modules() if child.rpartition(".")[2] in names)
    return next(found, None)


def _experts(block: nn.Module, config: Any) -> Experts | None:
    """The block's mixture of experts: a child with ``experts`` and the config's counts."""
    from torch import nn

    found = next(
        (m for _, m in block.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)),
        None,
    )
    if found is None:
        return None
    experts: nn.Module = found.experts
    count = _config_int(config, "num_experts", "num_local_experts", "n_routed_experts")
    top_k = _config_int(config, "num_experts_per_tok", "moe_topk", "top_k")
    inner = _config_int(config, "moe_intermediate_size", "intermediate_size")
    if count is None or top_k is None or inner is None:
        return None
    fused = any(p.dim() == 3 for p in experts.parameters(recurse=False))  # noqa: PLR2004
    return Experts(count, top_k, inner, fused)


def _decoder(
    name: str,
    owner: nn.Module,
    blocks: Any,
    *,
    role: Literal["text", "talker", "encoder"],
    cross_source: CrossSource,
    unknown: list[str],
) -> Decoder:
    config = owner.config
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    heads_names = ("decoder_attention_heads",) if role != "encoder" else ()
    heads = _config_int(config, *heads_names, "num_attention_heads", "n_head", "num_heads") or 1
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    dense = next((b for b in blocks if _experts(b, config) is None), blocks[0])
    inner, buffers = _intermediate(dense, config, hidden)
    if role != "encoder":
        inner = _config_int(config, "decoder_ffn_dim") or inner
    layers = tuple(f"{name}.{i}" for i in range(len(blocks)))
    head_dim = _config_int(config, "head_dim", "d_kv") or hidden // heads
    vocab = _config_int(config, "vocab_size") or 0
    listed = getattr(config, "cross_attention_layers", None)
    if isinstance(listed, (list, tuple)):
        cross = tuple(i in listed for i in range(len(blocks)))
    else:
        cross = tuple(_has_child(block, _CROSS_NAMES) for block in blocks)
    windows = _windows(config, len(blocks), unknown, name)
    # A layer that only attends across (mllama's cross-attention layers) keeps no self-KV.
    windows = tuple(
        0 if cross[i] and not _has_child(block, _SELF_NAMES) else windows[i]
        for i, block in enumerate(blocks)
    )
    experts = next((e for e in (_experts(b, config) for b in blocks) if e), None)
    sparse = tuple(_experts(block, config) is not None for block in blocks)
    score_bias = any(_has_child(b, ("relative_attention_bias",)) for b in (blocks[0], blocks[-1]))
    attention = next((a for a in (_child(b, _SELF_NAMES) for b in blocks) if a is not None), None)
    return Decoder(
        role,
        layers,
        hidden,
        inner,
        buffers,
        heads,
        kv_heads,
        head_dim,
        vocab,
        windows=windows,
        cross=cross if any(cross) else (),
        cross_source=cross_source if any(cross) else "",
        experts=experts,
        sparse=sparse if any(sparse) else (),
        score_bias=score_bias,
        batch_free_bias=score_bias and takes_position_bias(attention),
        attention=attention,
    )


def _block_lists(model: nn.Module) -> Iterator[tuple[str, nn.Module, Any]]:
    """``(name, owner, list)`` of every stack of blocks that its owner's config counts.

    Counted by ``num_hidden_layers``, ``depth``, ``encoder_layers`` or ``num_layers``. The
    blocks may differ in class (mllama mixes self- and cross-attention layers).
    """
    from torch import nn

    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        config = getattr(owner, "config", None)
        if config is None:
            continue
        counted = _config_int(config, "num_hidden_layers", "depth", "encoder_layers", "num_layers")
        if len(module) == counted:
            yield name, owner, module


def _scope(model: nn.Module, getter: str) -> str | None:
    """The qualified name of ``model.get_encoder()``/``get_decoder()`` of an encoder-decoder."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    found = getattr(model, getter, None)
    part = found() if callable(found) else None
    return next((n for n, m in model.named_modules() if m is part), None)


def _within(name: str, scope: str | None) -> bool:
    return scope is not None and (scope in ("", name) or name.startswith(f"{scope}."))


def _bound_decoder(model: nn.Module, vocab: int, unknown: list[str]) -> Decoder | None:
    """A conservative stand-in for a language model whose layers were not recognised.

    The longest stack of blocks, each sized as a full-attention layer without grouped KV heads
    (``kv_heads = heads``) and a gated MLP of its widest matrix.
    """
    from torch import nn

    stacks = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and isinstance(m[0], nn.Module)
    ]
    if not stacks:
        return None
    name, blocks = max(stacks, key=lambda item: len(item[1]))
    shapes = [tuple(p.shape) for p in blocks[0].parameters() if p.dim() == 2]  # noqa: PLR2004
    if not shapes:
        return None
    hidden = min(min(shape) for shape in shapes)
    inner = max(max(shape) for shape in shapes)
    heads = max(1, hidden // 64)
    unknown.append(
        f"the language model's layers were not recognised: the {len(blocks)} blocks of {name} are "
        f"sized as full-attention layers of width {hidden} without grouped KV heads, with a "
        f"{inner}-wide gated MLP (a conservative bound)"
    )
    layers = tuple(f"{name}.{i}" for i in range(len(blocks)))
    return Decoder("text", layers, hidden, inner, 3, heads, heads, hidden // heads, vocab)


_Stack = tuple[str, "nn.Module", Any, Literal["text", "talker", "encoder"]]


def _stacks(model: nn.Module) -> tuple[list[_Stack], list[Tower]]:
    """The model's decoder and encoder stacks, and its towers (see :func:`describe`)."""
    encoder, decoder = _scope(model, "get_encoder"), _scope(model, "get_decoder")
    found: list[_Stack] = []
    towers: list[Tower] = []
    for name, owner, blocks in _block_lists(model):
        config = owner.config
        in_decoder = _within(name, decoder) and not _within(name, encoder)
        if hasattr(config, "patch_size") and not in_decoder:
            tower = _tower("vision", name, owner, blocks)
            pooled = _config_int(model.config, "mm_tokens_per_image")
            side = (_config_int(config, "image_size") or 0) // (
                _config_int(config, "patch_size") or 1
            )
            if pooled and side:  # Gemma 3: every image's patches pooled to a fixed count
                tower = replace(tower, patches_per_token=max(1, side * side // pooled))
            towers.append(tower)
        elif hasattr(config, "num_mel_bins") and not in_decoder:
            towers.append(_tower("audio", name, owner, blocks))
        elif _within(name, encoder):
            found.append((name, owner, blocks, "encoder"))
        elif _config_int(config, "vocab_size"):
            top = name.partition(".")[0]
            found.append((name, owner, blocks, "talker" if "talker" in top else "text"))
    return found, towers


def describe(model: nn.Module) -> Anatomy:
    """Find the decoders, encoders, towers, embeddings and lm_head of ``model`` (on ``meta``).

    In an encoder-decoder model (``config.is_encoder_decoder``), the stacks under
    ``get_encoder()`` run once (an audio tower with ``num_mel_bins``, a vision tower with
    ``patch_size``, else a text encoder without KV cache) and those under ``get_decoder()``
    decode with self- and cross-attention KV. Elsewhere a stack is a vision tower when its
    config has ``patch_size``, an audio tower with ``num_mel_bins``, a decoder with
    ``vocab_size`` (the talker under ``talker``); other stacks (Omni's token2wav) count for
    their weights only.

    Example:
        >>> from omnifix._plan.anatomy import describe
        >>> from omnifix._plan.skeleton import build_skeleton
        >>> anatomy = describe(build_skeleton("qwen2-vl-7b"))
        >>> len(anatomy.text.layers), [tower.kind for tower in anatomy.towers], anatomy.lm_head
        (28, ['vision'], 'lm_head')
    """
    from torch import nn

    unknown: list[str] = []
    found, towers = _stacks(model)
    if any(role == "encoder" for *_, role in found):
        source: CrossSource = "prompt"
    elif _scope(model, "get_encoder") is not None and any(t.kind == "audio" for t in towers):
        source = "audio"
    else:
        source = "vision" if any(t.kind == "vision" for t in towers) else ""
    decoders = [
        _decoder(name, owner, blocks, role=role, cross_source=source, unknown=unknown)
        for name, owner, blocks, role in found
    ]
    embeddings = find_input_embeddings(model)
    text = next((d for d in decoders if d.role == "text"), None)
    vocab = text.vocab if text is not None else _config_int(model.config, "vocab_size") or 0
    heads = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == vocab and "talker" not in n
    ]
    lm_head = next((n for n in heads if n.endswith("lm_head")), heads[-1] if heads else None)
    if text is None and lm_head is not None:
        bound = _bound_decoder(model, vocab, unknown)
        if bound is not None:
            decoders.append(bound)
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
        unknown=tuple(unknown),
    )
