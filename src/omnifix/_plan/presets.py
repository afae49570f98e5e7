"""Built-in presets: the published configs of the checkpoints people run, offline.

Each preset is a data file, ``presets/<name>.json`` (its README says what the fields hold and
where the values come from), parsed by the installed transformers' own config class as
``from_pretrained`` parses a downloaded ``config.json``.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.resources
import json
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from omnifix._compat import installed_version, quiet
from omnifix.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["PRESETS", "PresetName", "find_preset", "preset_config", "preset_model_class"]
__all__ += ["preset_repo"]

PresetName = Literal[
    "qwen2-vl-7b",
    "qwen2.5-vl-3b",
    "qwen2.5-vl-7b",
    "qwen2.5-vl-72b",
    "qwen3-vl-235b-a22b",
    "qwen3-omni-30b-a3b",
    "qwen2.5-omni-3b",
    "qwen2.5-omni-7b",
    "qwen2-audio-7b",
    "llama-3.1-8b",
    "llama-3.2-11b-vision",
    "gemma-3-1b",
    "gemma-3-4b",
    "mistral-7b-v0.1",
    "qwen3-8b",
    "qwen3-30b-a3b",
    "qwen3-vl-8b",
    "qwen3-omni-30b-a3b-thinker",
    "whisper-large-v3",
    "flan-t5-large",
    "gpt2",
]

#: Every built-in preset, whether or not the installed transformers can build it.
PRESETS: Final[tuple[PresetName, ...]] = get_args(PresetName)


@functools.cache
def _read(preset: PresetName) -> dict[str, Any]:
    path = importlib.resources.files("omnifix._plan") / "presets" / f"{preset}.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _data(name: str) -> tuple[PresetName, dict[str, Any]]:
    """The preset's name and file: repo, config_class, model_class, min_transformers, config."""
    preset = find_preset(name)
    assert preset is not None  # noqa: S101 - required: find_preset raises instead
    return preset, _read(preset)


def find_preset(name: str, *, required: bool = True) -> PresetName | None:
    """The preset ``name`` means (case, the hub's organisation and ``-Instruct``/``-it`` ignored).

    Raises:
        UnsupportedModelError: ``required`` and ``name`` is no preset; the message lists the
            presets and suggests the closest.

    Example:
        >>> from omnifix._plan.presets import find_preset
        >>> find_preset("Qwen/Qwen2.5-Omni-7B"), find_preset("org/model", required=False)
        ('qwen2.5-omni-7b', None)
    """
    key = name.strip().lower().rpartition("/")[2].removesuffix("-instruct").removesuffix("-it")
    for preset in PRESETS:
        if key == preset:
            return preset
    if not required:
        return None
    known = ", ".join(repr(p) for p in PRESETS)
    close = difflib.get_close_matches(key, PRESETS, n=1, cutoff=0.5)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise UnsupportedModelError(
        f"No built-in preset named {name!r}; the presets are {known}. {hint}"
        "Pass one of those names (case does not matter; the hub repository id works too)."
    )


def _class(name: str, field: str) -> Any:
    """The transformers class the preset's ``field`` names (``config_class``, ``model_class``)."""
    import transformers

    preset, data = _data(name)
    cls = getattr(transformers, data[field], None)
    if cls is None:
        needed = data["min_transformers"]
        raise UnsupportedModelError(
            f"Preset {preset!r} ({data['repo']}) needs transformers>={needed}, but "
            f"transformers {installed_version('transformers')} is installed and has no "
            f"{data[field]}. "
            f"Upgrade it: pip install 'transformers>={needed}'"
        )
    return cls


def preset_repo(name: str) -> str | None:
    """The hub repository of the preset ``name`` means; ``None`` when it names no preset.

    Example:
        >>> from omnifix._plan.presets import preset_repo
        >>> preset_repo("qwen2.5-vl-7b"), preset_repo("./my-checkpoint")
        ('Qwen/Qwen2.5-VL-7B-Instruct', None)
    """
    preset = find_preset(name, required=False)
    return None if preset is None else str(_read(preset)["repo"])


def preset_config(name: str) -> PretrainedConfig:
    """A fresh config of the preset ``name`` (see :func:`find_preset`), parsed by transformers.

    Raises:
        UnsupportedModelError: ``name`` is not a preset (the message suggests the closest one),
            or the installed transformers predates the model family.

    Example:
        >>> from omnifix._plan.presets import preset_config
        >>> config = preset_config("Qwen/Qwen2-Audio-7B-Instruct")
        >>> config.text_config.hidden_size, config.audio_config.encoder_layers
        (4096, 32)
    """
    config_class = _class(name, "config_class")
    _, data = _data(name)
    # from_dict is what from_pretrained does with the downloaded config.json, so each release's
    # own layout conversion applies. Config classes mutate nested dicts (rope_scaling): a copy.
    with quiet():
        config: PretrainedConfig = config_class.from_dict(copy.deepcopy(data["config"]))
    return config


def preset_model_class(name: str) -> type[PreTrainedModel]:
    """The transformers class that loads the preset's checkpoint (the class of the full model).

    Example (errors as for :func:`preset_config`):
        >>> from omnifix._plan.presets import preset_model_class
        >>> preset_model_class("qwen2-vl-7b").__name__
        'Qwen2VLForConditionalGeneration'
    """
    model_class: type[PreTrainedModel] = _class(name, "model_class")
    return model_class
