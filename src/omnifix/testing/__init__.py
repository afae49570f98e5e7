"""Tiny random Qwen models for tests: every family, on every supported transformers, offline.

The real model classes, built from tiny configs in the installed transformers' own layout, and
inputs that match them. The families, a test-suite example and the choices behind the configs
are on docs/testing.md.

>>> import omnifix.testing as ot
>>> model = ot.tiny_model("qwen2-vl")
>>> inputs = ot.tiny_inputs("qwen2-vl", model.config)
>>> model(**inputs).logits.shape
torch.Size([1, 14, 256])
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, cast

from omnifix.testing._configs import (
    FAMILIES,
    Family,
    available_families,
    model_class,
    speakers,
    tiny_config,
)
from omnifix.testing._inputs import tiny_inputs

if TYPE_CHECKING:
    import os
    import pathlib

    from transformers import PreTrainedModel

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


def tiny_model(family: Family, *, seed: int = 0) -> PreTrainedModel:
    """A tiny random model of ``family``: float32, in ``eval()`` mode, on the CPU.

    The same ``seed`` gives the same weights, without touching the global random state. The full
    Omni model also gets the speakers ``from_pretrained`` loads from ``spk_dict.pt``.

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

    cls: Any = model_class(family)
    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.to(dtype=torch.float32)
    model.eval()
    if family == "qwen2.5-omni":
        model.speaker_map.update(speakers())
    return cast("PreTrainedModel", model)


def save_tiny_model(family: Family, path: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Save :func:`tiny_model` to ``path`` with every file ``from_pretrained`` needs.

    That is what ``save_pretrained`` writes, plus ``spk_dict.pt`` (the speakers) for the full
    Omni model. ``model_class(family).from_pretrained(path)`` loads the same weights offline.

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
        # from_pretrained fails without it (the real checkpoint ships one); save_pretrained
        # does not write it.
        torch.save(speakers(), target / "spk_dict.pt")
    return target


def text_generation_kwargs(family: Family, *, max_new_tokens: int = 2) -> dict[str, Any]:
    """Extra ``generate`` arguments for text-only generation of ``max_new_tokens`` tokens.

    Just ``max_new_tokens``, except for the full Omni model, whose ``generate`` forwards only
    ``thinker_``-prefixed options to the thinker and would also run the talker and token2wav:
    there audio is turned off (``return_audio=False`` up to 4.57, ``generation_mode="text"`` in
    5.x), and ``generate`` returns the thinker's token ids.

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
    cls: Any = model_class(family)
    if family != "qwen2.5-omni":
        return {"max_new_tokens": max_new_tokens}
    kwargs: dict[str, Any] = {"thinker_max_new_tokens": max_new_tokens}
    if "return_audio" in inspect.signature(cls.generate).parameters:
        kwargs["return_audio"] = False
    else:
        kwargs["generation_mode"] = "text"
    return kwargs
