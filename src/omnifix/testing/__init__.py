"""Tiny random Qwen models for tests: every family, on every supported transformers, offline.

Builders make the real model classes from tiny configs (width 32, 4 language-model layers, a
256-token vocabulary) in the installed transformers' own layout, random but deterministic, in
well under a second; :func:`save_tiny_model` writes a directory the real ``from_pretrained``
loads, and :func:`tiny_inputs` gives matching inputs (placeholder tokens, ``pixel_values``,
``input_features``). Families your transformers lacks raise
:class:`omnifix.UnsupportedModelError`: parametrise over :func:`available_families`. The
families, a test-suite example and the choices behind the configs are on docs/testing.md.

>>> import omnifix.testing as ot
>>> "qwen2" in ot.available_families()
True
>>> model = ot.tiny_model("qwen2-vl")
>>> inputs = ot.tiny_inputs("qwen2-vl", model.config)
>>> model(**inputs).logits.shape
torch.Size([1, 14, 256])
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, cast

from omnifix.errors import InvalidArgumentError
from omnifix.testing import _configs, _inputs
from omnifix.testing._configs import FAMILIES, Family

if TYPE_CHECKING:
    import os
    import pathlib

    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from omnifix._types import DeviceLike

__all__ = [
    "FAMILIES",
    "Family",
    "available_families",
    "model_class",
    "save_tiny_model",
    "text_generation_kwargs",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
]


def available_families() -> tuple[Family, ...]:
    """The families the installed transformers supports, in :data:`FAMILIES` order.

    Returns:
        A sub-tuple of :data:`FAMILIES`: Qwen2.5-VL needs transformers 4.49 and Qwen2.5-Omni 4.52.

    Example:
        >>> import omnifix.testing as ot
        >>> families = ot.available_families()
        >>> {"qwen2", "qwen2-vl", "qwen2-audio"} <= set(families)
        True
        >>> families == tuple(f for f in ot.FAMILIES if f in families)
        True
    """
    return _configs.available_families()


def model_class(family: Family) -> type[PreTrainedModel]:
    """The transformers model class of ``family``.

    Args:
        family: One of :data:`FAMILIES`.

    Returns:
        The class :func:`tiny_model` instantiates and whose ``from_pretrained`` loads the
        directory :func:`save_tiny_model` writes. For ``"qwen2.5-omni-thinker"`` it is
        ``Qwen2_5OmniThinkerForConditionalGeneration``, for ``"qwen2.5-omni"``
        ``Qwen2_5OmniForConditionalGeneration`` (thinker, talker and token2wav).

    Raises:
        UnsupportedModelError: ``family`` is unknown, or the installed transformers predates it.

    Example:
        >>> import omnifix.testing as ot
        >>> ot.model_class("qwen2-vl").__name__
        'Qwen2VLForConditionalGeneration'
    """
    return _configs.model_class(family)


def tiny_config(family: Family) -> PretrainedConfig:
    """A fresh tiny config of ``family``, in the layout of the installed transformers.

    Language models: width 32, 4 layers, 2 query heads of 16 dims sharing 1 key/value head,
    256-token vocabulary, multimodal RoPE sections ``(2, 3, 3)`` where the family uses them.
    Vision towers: 2 blocks of width 32. Audio towers: 2 layers of width 32,
    ``max_source_positions=16``. Omni's talker mirrors the thinker's language model; its
    token2wav (DiT + BigVGAN) is 2 blocks of width 32 and 8 mel bins.

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
    return _configs.tiny_config(family)


def tiny_model(family: Family, *, seed: int = 0) -> PreTrainedModel:
    """A tiny random model of ``family``: float32, in ``eval()`` mode, on the CPU.

    The same ``seed`` gives the same weights, on every call and without touching the global
    random state. The full Omni model also gets its speakers (``Chelsie``, ``Ethan``), as
    ``from_pretrained`` would load them from ``spk_dict.pt``, so ``generate`` works on it.

    Args:
        family: One of :data:`FAMILIES`.
        seed: Seed of the random initialisation.

    Returns:
        An instance of :func:`model_class` built from :func:`tiny_config`.

    Raises:
        UnsupportedModelError: ``family`` is unknown, or the installed transformers predates it.

    Example:
        >>> import torch
        >>> import omnifix.testing as ot
        >>> a, b = ot.tiny_model("qwen2", seed=1), ot.tiny_model("qwen2", seed=1)
        >>> torch.equal(a.lm_head.weight, b.lm_head.weight), a.training, a.dtype
        (True, False, torch.float32)
    """
    import torch

    cls: Any = _configs.model_class(family)
    config = _configs.tiny_config(family)
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.to(dtype=torch.float32)
    model.eval()
    if family == "qwen2.5-omni":
        model.speaker_map.update(_configs.speakers())
    return cast("PreTrainedModel", model)


def save_tiny_model(family: Family, path: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Save :func:`tiny_model` to ``path`` with every file ``from_pretrained`` needs.

    That is ``config.json``, the safetensors weights and ``generation_config.json`` (from
    ``save_pretrained``), plus ``spk_dict.pt`` (the speakers) for the full Omni model. Loading
    needs no network: ``model_class(family).from_pretrained(path)`` gives the same weights.

    Args:
        family: One of :data:`FAMILIES`.
        path: The directory to write; created if missing.
        seed: Seed of the random initialisation (see :func:`tiny_model`).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        UnsupportedModelError: ``family`` is unknown, or the installed transformers predates it.

    Example:
        >>> import tempfile, torch
        >>> import omnifix.testing as ot
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = ot.save_tiny_model("qwen2-audio", tmp)
        ...     loaded = ot.model_class("qwen2-audio").from_pretrained(path)
        >>> saved = ot.tiny_model("qwen2-audio")
        >>> all(torch.equal(t, loaded.state_dict()[k]) for k, t in saved.state_dict().items())
        True
    """
    import pathlib

    import torch

    model = tiny_model(family, seed=seed)
    target = pathlib.Path(path)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    if family == "qwen2.5-omni":
        # Qwen2_5OmniForConditionalGeneration.from_pretrained fails without it; the real
        # checkpoint ships one too. save_pretrained does not know about it, so we write it.
        torch.save(_configs.speakers(), target / "spk_dict.pt")
    return target


def tiny_inputs(
    family: Family,
    config: PretrainedConfig,
    *,
    batch_size: int = 1,
    text_tokens: int = 8,
    device: DeviceLike = "cpu",
) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``model(**inputs)`` and ``model.generate(**inputs)``.

    Every sample is ``text_tokens`` random text tokens with the media placeholders in the middle,
    laid out as the real processors do (the sizes below are those of the tiny configs):

    - VL families: one image of ``(1, 4, 4)`` patches (``image_grid_thw``), i.e.
      ``<|vision_start|>`` + 4 ``<|image_pad|>`` + ``<|vision_end|>``, with ``pixel_values`` of
      shape ``(16 * batch_size, 1176)`` and ``image_grid_thw`` of shape ``(batch_size, 3)``.
    - Audio families: ``2 * max_source_positions`` mel frames (what Qwen2-Audio insists on),
      i.e. ``input_features`` of shape ``(batch_size, 128, 32)``, an all-ones
      ``feature_attention_mask`` and 8 ``<|AUDIO|>`` placeholders. On transformers older than
      4.48 Qwen2-Audio expands a single placeholder itself, so there you get one, and the
      model's logits are 7 positions longer than ``input_ids``.
    - Qwen2.5-Omni (thinker and full model): both the image and the audio, each between its
      start and end tokens. For the full model these are the thinker's inputs; pass them with
      :func:`text_generation_kwargs` to ``generate`` for text only (``return_audio=False`` on
      4.52-4.57, ``generation_mode="text"`` on 5.x).

    Samples have the same length, so ``attention_mask`` is all ones. Text tokens are drawn
    below every special token. The tensors only depend on the arguments (a fixed seed), and
    geometry and token ids are read from ``config``, so a config you changed gets matching
    inputs.

    Args:
        family: One of :data:`FAMILIES`; says which modalities to include.
        config: The model's config (``model.config``); for the full Omni model its
            ``thinker_config`` is used.
        batch_size: Number of samples.
        text_tokens: Text tokens per sample, besides the media tokens.
        device: Where to put the tensors (anything :func:`omnifix.normalize_device` takes).

    Returns:
        ``input_ids`` and ``attention_mask`` (``batch_size x sequence``), plus ``pixel_values``
        and ``image_grid_thw`` and/or ``input_features`` and ``feature_attention_mask``, plus
        ``mm_token_type_ids`` where the model takes them (Qwen2-VL and Qwen2.5-VL on 5.x, whose
        processors return them and whose multimodal RoPE needs them).

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
    checked = _configs.check_family(family)
    if batch_size < 1 or text_tokens < 0:
        raise InvalidArgumentError(
            f"tiny_inputs got batch_size={batch_size} and text_tokens={text_tokens}. "
            "Pass batch_size >= 1 and text_tokens >= 0."
        )
    return _inputs.build_inputs(
        checked, config, batch_size=batch_size, text_tokens=text_tokens, device=device
    )


def text_generation_kwargs(family: Family, *, max_new_tokens: int = 2) -> dict[str, Any]:
    """Extra ``generate`` arguments for text-only generation of ``max_new_tokens`` tokens.

    For most families that is just ``max_new_tokens``. The full Omni model's ``generate``
    forwards only ``thinker_``-prefixed options to its thinker and would otherwise also run the
    talker and token2wav; how to switch that off changed: ``return_audio=False`` up to 4.57,
    ``generation_mode="text"`` in 5.x. It then returns the thinker's token ids.

    Args:
        family: One of :data:`FAMILIES`.
        max_new_tokens: How many tokens to generate at most.

    Returns:
        Keyword arguments to pass to ``model.generate`` next to :func:`tiny_inputs`.

    Raises:
        UnsupportedModelError: ``family`` is unknown, or the installed transformers predates it.

    Example:
        >>> import omnifix.testing as ot
        >>> ot.text_generation_kwargs("qwen2-vl", max_new_tokens=3)
        {'max_new_tokens': 3}
        >>> model = ot.tiny_model("qwen2")
        >>> inputs = ot.tiny_inputs("qwen2", model.config)
        >>> model.generate(**inputs, **ot.text_generation_kwargs("qwen2")).shape[1] <= 8 + 2
        True
    """
    cls: Any = _configs.model_class(family)
    if family != "qwen2.5-omni":
        return {"max_new_tokens": max_new_tokens}
    kwargs: dict[str, Any] = {"thinker_max_new_tokens": max_new_tokens}
    if "return_audio" in inspect.signature(cls.generate).parameters:
        kwargs["return_audio"] = False
    else:
        kwargs["generation_mode"] = "text"
    return kwargs
