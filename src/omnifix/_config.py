"""Config and class: what ``from_pretrained`` of a checkpoint reads, and which class it builds.

The first step of both planning and loading.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

from omnifix._compat import quiet, transformers_version
from omnifix.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["HUB_KWARGS", "is_auto_class", "model_class_for", "named_class", "read_config"]

#: ``from_pretrained`` keywords that also locate the config (``AutoConfig`` takes them too).
HUB_KWARGS: Final = (
    "cache_dir",
    "force_download",
    "proxies",
    "local_files_only",
    "token",
    "use_auth_token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "code_revision",
)
#: What the Auto factories map a config without ``architectures`` to, most specific first.
_AUTO_FACTORIES: Final = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel")


def is_auto_class(model_class: type[Any] | None) -> bool:
    """Whether ``model_class`` is an Auto class (it maps configs to classes) or ``None``."""
    return model_class is None or getattr(model_class, "_model_mapping", None) is not None


def named_class(architectures: object) -> type[Any] | None:
    """The first class of a config's ``architectures`` that the installed transformers ships."""
    import transformers

    names = architectures if isinstance(architectures, (list, tuple)) else ()
    for name in names:
        found = getattr(transformers, str(name), None)
        if isinstance(found, type):
            return found
    return None


def model_class_for(config: PretrainedConfig, model_class: type[Any] | None = None) -> type[Any]:
    """The concrete class that loads ``config``'s checkpoint.

    ``model_class`` itself when it is concrete; for an Auto class, the class it maps the config
    to; for ``None``, the config's ``architectures`` (or, when it names none, the Auto factories'
    choice).

    Raises:
        UnsupportedModelError: No class is known for the config; the message says what to pass.

    Example:
        >>> from transformers import Qwen2Config
        >>> from omnifix._config import model_class_for
        >>> model_class_for(Qwen2Config()).__name__
        'Qwen2ForCausalLM'
    """
    import transformers

    if model_class is not None and not is_auto_class(model_class):
        return model_class
    kind = type(config).__name__
    if model_class is not None:
        try:
            concrete: type[Any] = model_class._model_mapping[type(config)]  # noqa: SLF001
        except (KeyError, ValueError) as error:
            raise UnsupportedModelError(
                f"{model_class.__name__} has no model class for {kind} (model type "
                f"{getattr(config, 'model_type', '?')!r}). Pass the concrete class, e.g. "
                f"model_class=transformers.{(config.architectures or ['<ClassName>'])[0]}."
            ) from error
        return concrete
    architectures = list(getattr(config, "architectures", None) or [])
    found = named_class(architectures)
    if found is not None:
        return found
    if not architectures:
        for factory in _AUTO_FACTORIES:
            mapping = getattr(getattr(transformers, factory, None), "_model_mapping", None)
            try:
                return mapping[type(config)]  # type: ignore[no-any-return,index]
            except (KeyError, TypeError):
                continue
    named = f"names {architectures}" if architectures else "names no architecture"
    raise UnsupportedModelError(
        f"The config ({kind}) {named} that transformers {transformers_version()} ships. Pass "
        "model_class= (e.g. transformers.AutoModelForCausalLM, or the remote-code class), or "
        "upgrade transformers."
    )


def read_config(
    source: str | os.PathLike[str], *, model_class: type[Any] | None = None, **hub_kwargs: Any
) -> PretrainedConfig:
    """The config ``from_pretrained(source, **hub_kwargs)`` would read, without the weights.

    The ``config_class`` of a concrete ``model_class`` reads it (as ``from_pretrained`` does);
    without a class, that of the class ``config.json`` names (sub-model types such as
    ``qwen2_5_omni_thinker``, which 4.5x's ``AutoConfig`` does not register), else ``AutoConfig``.

    Raises:
        CheckpointError: No readable config at ``source`` (a missing directory or file, broken
            JSON, a name that is no Hub repository).
        UnsupportedModelError: The installed transformers does not know the model type.
    """
    from transformers import AutoConfig, PretrainedConfig

    where = os.fspath(source)
    try:
        raw, _ = PretrainedConfig.get_config_dict(source, **hub_kwargs)
    # 4.45 raises OSError for a missing directory or config, 4.57+ huggingface_hub's
    # HFValidationError (a ValueError) for a path that is no repo id, json errors are ValueErrors:
    # all mean "no readable checkpoint here".
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"Cannot read the config of {where!r}: {error}. Pass the directory that holds "
            "config.json and the weights (as written by save_pretrained), or a Hub model id such "
            "as 'Qwen/Qwen2.5-VL-7B-Instruct' with network access or a warm cache."
        ) from error
    concrete = None if is_auto_class(model_class) else model_class
    if concrete is None and model_class is None:
        concrete = named_class(raw.get("architectures"))
    reader: Any = AutoConfig if concrete is None else concrete.config_class
    try:
        with quiet():  # the rope and vocabulary notices every load of these configs logs
            config: PretrainedConfig = reader.from_pretrained(source, **hub_kwargs)
    except ValueError as error:  # a model type this transformers does not know
        raise UnsupportedModelError(
            f"transformers {transformers_version()} cannot read the config of {where!r}: "
            f"{error}. Upgrade transformers, or pass model_class= (the class that loads it, e.g. "
            "a remote-code class with trust_remote_code=True)."
        ) from error
    return config
