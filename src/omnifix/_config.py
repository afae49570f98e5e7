"""Config and class: what ``from_pretrained`` of a checkpoint reads, and which class it builds.

The first step of both planning and loading.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from omnifix._compat import quiet, transformers_version
from omnifix.errors import CheckpointError, InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from transformers import PretrainedConfig

__all__ = [
    "HUB_KWARGS",
    "HUB_TIMEOUT",
    "fetch_config",
    "is_auto_class",
    "is_hub_id",
    "model_class_for",
    "named_class",
    "read_config",
    "require_model_class",
]

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
#: Seconds the Hub may take to connect and answer the one request for ``config.json`` (no
#: retries): an unreachable or silent Hub fails within a few seconds, not after a retry loop.
HUB_TIMEOUT: Final = 3.0
#: A Hub repository id: ``name`` or ``owner/name`` (letters, digits, ``-``, ``_``, ``.``).
_REPO_ID: Final = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
#: What the Auto factories map a config without ``architectures`` to, most specific first.
_AUTO_FACTORIES: Final = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel")


def require_model_class(model_class: object) -> None:
    """Refuse a ``model_class`` that is neither ``None`` nor a class that loads checkpoints.

    Raises:
        InvalidArgumentError: A name, an instance, or a class without ``from_pretrained``.
    """
    loads = callable(getattr(model_class, "from_pretrained", None))
    if model_class is None or (isinstance(model_class, type) and loads):
        return
    named = f" (model_class=transformers.{model_class})" if isinstance(model_class, str) else ""
    raise InvalidArgumentError(
        f"model_class={model_class!r} is not a transformers model class: it takes the class "
        f"itself{named}, a PreTrainedModel subclass or an Auto class. Pass the class, or "
        "model_class=None to use the class the checkpoint's config names."
    )


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

    require_model_class(model_class)
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


def is_hub_id(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a Hub repository: ``owner/name``, not a path that exists."""
    text = os.fspath(source)
    return (
        isinstance(source, str)
        and "/" in text
        and _REPO_ID.match(text) is not None
        and not text.endswith(".json")
        and not Path(text).exists()
    )


def fetch_config(repo_id: str, **hub_kwargs: Any) -> Path:
    """The folder holding ``repo_id``'s ``config.json``, read through huggingface_hub.

    First one ``HEAD`` on huggingface_hub's session, of at most :data:`HUB_TIMEOUT` seconds and
    without retries (huggingface_hub's download retries a failed one for up to a minute). Where
    it fails, or under ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``, the cache alone.
    ``revision``, ``subfolder``, ``token`` (default: ``HF_TOKEN`` or the saved login),
    ``cache_dir`` and ``HF_ENDPOINT`` are honoured. No weights are read.

    Raises:
        CheckpointError: The Hub cannot be reached (or is off) and the config is not cached, the
            repository or revision does not exist, or it is gated or private; in one line with
            the fix.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    revision, subfolder = hub_kwargs.get("revision"), hub_kwargs.get("subfolder") or None
    cache_dir = hub_kwargs.get("cache_dir")
    offline = bool(constants.HF_HUB_OFFLINE or hub_kwargs.get("local_files_only"))
    failed = None if offline else _probe(repo_id, subfolder, revision, hub_kwargs)
    found: object = None
    try:
        if offline or failed is not None:
            filename = f"{subfolder}/config.json" if subfolder else "config.json"
            found = try_to_load_from_cache(
                repo_id, filename, cache_dir=cache_dir, revision=revision
            )
        else:
            found = hf_hub_download(
                repo_id,
                "config.json",
                subfolder=subfolder,
                revision=revision,
                token=hub_kwargs.get("token", hub_kwargs.get("use_auth_token")),
                cache_dir=cache_dir,
                force_download=bool(hub_kwargs.get("force_download")),
                etag_timeout=HUB_TIMEOUT,
            )
    except Exception as error:  # noqa: BLE001 - every failure is "no config from the Hub"
        failed = failed or error
    if not isinstance(found, str):
        at = f"{repo_id}@{revision}" if revision else repo_id
        why = _hub_failure(failed, offline=offline)
        raise CheckpointError(
            f"Cannot read the config of {at!r} from the Hub: {why}. Fix: pass a local checkpoint "
            "directory (its config.json is enough to plan) or a built-in preset such as "
            "'qwen2.5-vl-7b'."
        )
    return Path(found).parent


def _probe(
    repo_id: str, subfolder: str | None, revision: str | None, hub_kwargs: Mapping[str, Any]
) -> Exception | None:
    """One ``HEAD`` for the config: ``None`` when the Hub has it, else what went wrong."""
    from huggingface_hub import get_session, get_token, hf_hub_url, utils

    token = hub_kwargs.get("token", hub_kwargs.get("use_auth_token"))
    if token is None or token is True:
        token = get_token()
    headers = {"authorization": f"Bearer {token}"} if isinstance(token, str) else {}
    url = hf_hub_url(repo_id, "config.json", subfolder=subfolder, revision=revision)
    try:
        response = get_session().head(url, headers=headers, timeout=HUB_TIMEOUT)
        if response.status_code >= 400:  # noqa: PLR2004 - an HTTP error
            hub_utils: Any = utils  # raise_for_status is typed as private there
            hub_utils.hf_raise_for_status(response)
    except Exception as error:  # noqa: BLE001 - any failure: the caller tries the cache
        return error
    return None


def _hub_failure(error: Exception | None, *, offline: bool) -> str:
    """Why the Hub gave no config, in a few words."""
    kind = type(error).__name__
    status = getattr(getattr(error, "response", None), "status_code", None)
    if offline:
        return "HF_HUB_OFFLINE is set and its config.json is not in the Hugging Face cache"
    if kind in ("RepositoryNotFoundError", "GatedRepoError") or status in (401, 403):
        return "no such repository, or it is private or gated (pass token= or set HF_TOKEN)"
    if kind in ("RevisionNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"no config.json at that revision ({kind})"
    if status is None:  # no answer: a timeout, a refused or unresolvable host, a proxy
        return (
            f"the Hub cannot be reached within {HUB_TIMEOUT:g} s ({kind}) and its config.json "
            "is not in the Hugging Face cache"
        )
    return f"the Hub answered {status} ({kind})"


def read_config(
    source: str | os.PathLike[str], *, model_class: type[Any] | None = None, **hub_kwargs: Any
) -> PretrainedConfig:
    """The config ``from_pretrained(source, **hub_kwargs)`` would read, without the weights.

    The ``config_class`` of a concrete ``model_class`` reads it (as ``from_pretrained`` does);
    without a class, that of the class ``config.json`` names (sub-model types such as
    ``qwen2_5_omni_thinker``, which 4.5x's ``AutoConfig`` does not register), else ``AutoConfig``.

    Raises:
        CheckpointError: No readable config at ``source`` (a missing directory or file, broken
            JSON, a name that is no Hub repository); for a Hub id, as :func:`fetch_config`.
        UnsupportedModelError: The installed transformers does not know the model type.
    """
    from transformers import AutoConfig, PretrainedConfig

    require_model_class(model_class)
    where = os.fspath(source)
    _require_local_config(where, str(hub_kwargs.get("subfolder") or ""))
    if is_hub_id(source) and not hub_kwargs.get("trust_remote_code"):
        # Its config.json from the Hub within seconds; read from the cache like a directory.
        folder = fetch_config(os.fspath(source), **hub_kwargs)
        source, hub_kwargs = folder, {}
    elif is_hub_id(source):  # remote code comes with it: check the Hub answers, then read
        fetch_config(os.fspath(source), **hub_kwargs)
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
    elif concrete is not None:
        _require_matching_class(where, raw, concrete)
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


def _require_local_config(where: str, subfolder: str) -> None:
    """A local path (absolute, or starting with ``.`` or ``~``): a config, or a folder with one.

    Hub ids are ``name`` or ``owner/name``; anything spelled as a path is a path, so that a typo
    in it says "no such folder" rather than the Hub's rules for repository ids.
    """
    path = Path(where).expanduser()
    if not (path.is_absolute() or where.startswith((".", "~")) or path.exists()):
        return
    folder = path / subfolder
    problem = ""
    if path.is_file():  # a config.json: AutoConfig reads it
        return
    if not path.is_dir():
        problem = "no such folder"
    elif not folder.is_dir():
        problem = f"it has no subfolder {subfolder!r}"
    elif not (folder / "config.json").is_file():
        problem = f"{folder} has no config.json"
    if problem:
        raise CheckpointError(
            f"Cannot read the config of {where!r}: {problem}. Pass the folder that holds "
            "config.json and the weights (as written by save_pretrained), or a Hub model id."
        )


def _require_matching_class(where: str, raw: dict[str, Any], concrete: type[Any]) -> None:
    """Refuse a class built for another model type than the checkpoint's (weights would be new)."""
    found = raw.get("model_type")
    config_class = getattr(concrete, "config_class", None)
    wanted = getattr(config_class, "model_type", "")
    sub_types = {
        getattr(sub, "model_type", key)
        for key, sub in (getattr(config_class, "sub_configs", None) or {}).items()
    }
    if not found or not wanted or found == wanted or found in sub_types:
        return
    architectures = named_class(raw.get("architectures"))
    own = f"model_class=transformers.{architectures.__name__}" if architectures else ""
    raise UnsupportedModelError(
        f"{where!r} holds a {found!r} checkpoint, and model_class={concrete.__name__} builds "
        f"{wanted!r} models: most of its weights would be left freshly random. Pass "
        f"{own + ' or ' if own else ''}model_class=None (the class the checkpoint names)."
    )
