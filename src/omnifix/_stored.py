"""What a checkpoint stores, read from its safetensors headers alone: never the weights.

A safetensors file starts with the length of its JSON header (8 bytes, little-endian) and the
header, which names every tensor's dtype and shape. A local checkpoint's headers are read from
``model.safetensors`` or the shards its ``model.safetensors.index.json`` names (the files
``from_pretrained`` reads, in that order); a Hub repository's through huggingface_hub's
``HfApi.get_safetensors_metadata`` (ranged requests for the headers only), or from the
Hugging Face cache offline.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from omnifix._config import HUB_TIMEOUT, is_hub_id
from omnifix.errors import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    import torch

__all__ = ["StoredWeights", "read_hub", "read_local", "remembered", "stored_weights"]

_SINGLE: Final = "model.safetensors"
_INDEX: Final = "model.safetensors.index.json"
#: The largest header the safetensors library itself reads (100 MB).
_HEADER_LIMIT: Final = 100_000_000
#: safetensors' dtype names, as torch names them.
_DTYPES: Final = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
    "F6_E2M3": "float6_e2m3",
    "F6_E3M2": "float6_e3m2",
    "C64": "complex64",
}
#: The dtypes ``from_pretrained(dtype="auto")`` may load a model in (it skips float8 and float4).
_FLOATS: Final = frozenset({"float16", "bfloat16", "float32", "float64"})
_FIX: Final = (
    "The checkpoint is incomplete or corrupt (an interrupted download or copy). Fix: download "
    "or copy the checkpoint again (huggingface-cli download <repo> --force-download for a Hub "
    "model), then retry."
)

#: One file's tensors: name -> (torch dtype name, number of values).
_Tensors = dict[str, tuple[str, int]]


@dataclass(frozen=True)
class StoredWeights:
    """The tensors a checkpoint stores, by dtype, as its safetensors headers say.

    Attributes:
        source: The checkpoint (a directory or a Hub id).
        counts: ``(dtype, values)`` for each stored dtype, most values first (torch's names).
        auto: The dtype ``from_pretrained(dtype="auto")`` loads when config.json names none:
            the index's own ``dtype``, else that of the first floating tensor of the first file
            (transformers' rule); ``None`` without one.
        packed: ``(dtype, tensors)`` of weights stored in an integer or 8/6/4-bit float dtype:
            quantised weights, packed.

    Example:
        >>> from omnifix._stored import StoredWeights
        >>> stored = StoredWeights("tiny", (("bfloat16", 2048), ("float32", 64)), "bfloat16", ())
        >>> stored.describe(), stored.auto_dtype
        ('2,048 bfloat16, 64 float32', torch.bfloat16)
    """

    source: str
    counts: tuple[tuple[str, int], ...]
    auto: str | None
    packed: tuple[tuple[str, int], ...]

    @property
    def auto_dtype(self) -> torch.dtype | None:
        """:attr:`auto` as a torch dtype."""
        import torch

        found = getattr(torch, self.auto or "", None)
        return found if isinstance(found, torch.dtype) else None

    def describe(self) -> str:
        """``"2,048 bfloat16, 64 float32"``: the values stored in each dtype."""
        return ", ".join(f"{count:,} {dtype}" for dtype, count in self.counts)

    @classmethod
    def of(
        cls, source: str, files: Iterable[_Tensors], metadata: Mapping[str, Any] | None = None
    ) -> StoredWeights:
        """Sum ``files`` (in the order ``from_pretrained`` reads them) per dtype."""
        counts: dict[str, int] = {}
        packed: dict[str, int] = {}
        auto = (metadata or {}).get("dtype")
        auto = auto if isinstance(auto, str) and auto in _FLOATS else None
        for tensors in files:
            for name in sorted(tensors):  # safetensors lists a file's tensors by name
                dtype, count = tensors[name]
                counts[dtype] = counts.get(dtype, 0) + count
                if auto is None and dtype in _FLOATS:
                    auto = dtype
                if name.endswith("weight") and dtype not in _FLOATS and dtype != "bool":
                    packed[dtype] = packed.get(dtype, 0) + 1
        ordered = tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        return cls(source, ordered, auto, tuple(sorted(packed.items())))


def _broken(file: object, problem: str) -> CheckpointError:
    return CheckpointError(f"The safetensors header of {os.fspath(str(file))!r} {problem}. {_FIX}")


def _tensors(file: object, header: object) -> _Tensors:
    """A parsed header's tensors, checked: each a known dtype and a shape of sizes."""
    if not isinstance(header, dict):
        raise _broken(file, f"is JSON but not an object of tensors ({type(header).__name__})")
    tensors: _Tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        fields = entry if isinstance(entry, dict) else {}
        dtype, shape = fields.get("dtype"), fields.get("shape")
        if dtype not in _DTYPES:
            raise _broken(file, f"gives tensor {name!r} the unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(size, int) and size >= 0 for size in shape
        ):
            raise _broken(file, f"gives tensor {name!r} the shape {shape!r}, not a list of sizes")
        count = 1
        for size in shape:
            count *= size
        tensors[name] = (_DTYPES[dtype], count)
    return tensors


def _read_header(path: Path) -> _Tensors:
    """The tensors of the safetensors file at ``path``, from its first bytes."""
    try:
        total = path.stat().st_size
        with path.open("rb") as file:
            prefix = file.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None  # noqa: PLR2004
            if size is None or size > min(total - 8, _HEADER_LIMIT):
                shown = "not there" if size is None else f"{size:,} bytes long"
                raise _broken(
                    path,
                    f"is cut short: its length field says {shown}, the file is {total:,} bytes",
                )
            raw = file.read(size)
    except OSError as error:
        if isinstance(error, CheckpointError):
            raise
        raise _broken(path, f"cannot be read ({error})") from None
    try:
        header = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise _broken(path, "is not JSON") from None
    return _tensors(path, header)


def _index(path: Path) -> tuple[list[str], dict[str, Any]]:
    """The shards an index names (sorted, as ``from_pretrained`` reads them), and its metadata."""
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        shards = sorted({str(shard) for shard in weight_map.values()})
        metadata = index.get("metadata") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"The safetensors index {os.fspath(path)!r} is not one "
            f"({type(error).__name__}: {error}). {_FIX}"
        ) from None
    return shards, metadata if isinstance(metadata, dict) else {}


def read_local(folder: str | os.PathLike[str]) -> StoredWeights | None:
    """The stored weights of the checkpoint directory ``folder``; ``None`` without safetensors.

    Raises:
        CheckpointError: A header or index that is cut short, not JSON, or names a dtype or
            shard that is not there; the message names the file.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from omnifix._stored import read_local
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_file({"w": torch.zeros(4, 8), "b": torch.zeros(8)}, f"{tmp}/model.safetensors")
        ...     read_local(tmp).describe()
        '40 float32'
    """
    root = Path(folder)

    def local(filename: str) -> Path | None:
        return root / filename if (root / filename).is_file() else None

    return _read_files(os.fspath(folder), local, complete=True)


def _cached(repo_id: str, revision: str | None) -> StoredWeights | None:
    """The stored weights of ``repo_id`` from the Hugging Face cache, if its files are there."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        return Path(found) if isinstance(found, str) else None

    return _read_files(repo_id, cached, complete=False)


def _read_files(
    source: str, find: Callable[[str], Path | None], *, complete: bool
) -> StoredWeights | None:
    """``model.safetensors``, else the shards the index names, as ``find`` locates them.

    ``complete``: a shard the index names must be there (a checkpoint directory); else a
    missing one means the files are not all at hand (the Hugging Face cache): ``None``.
    """
    single = find(_SINGLE)
    if single is not None:
        return StoredWeights.of(source, [_read_header(single)])
    index = find(_INDEX)
    if index is None:
        return None
    shards, metadata = _index(index)
    paths = [find(shard) for shard in shards]
    if not complete and None in paths:
        return None
    files = []
    for shard, path in zip(shards, paths, strict=True):
        if path is None:
            raise _broken(index.parent / shard, "is missing: the index names it")
        files.append(_read_header(path))
    return StoredWeights.of(source, files, metadata)


def read_hub(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None
) -> StoredWeights | None:
    """The stored weights of the Hub repository ``repo_id``, from its headers alone.

    Through ``HfApi.get_safetensors_metadata`` (ranged requests), given
    :data:`~omnifix._config.HUB_TIMEOUT` seconds in all; under ``HF_HUB_OFFLINE=1``, or where
    the Hub does not answer in time, from the Hugging Face cache. ``None`` where neither has
    them (no safetensors, nothing cached): the plan goes without.

    Raises:
        CheckpointError: A header the Hub serves is not one; the message names the file.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import SafetensorsParsingError

    if constants.HF_HUB_OFFLINE:
        return _cached(repo_id, revision)
    api = HfApi()
    kwargs: dict[str, Any] = {"revision": revision, "token": token}
    if "timeout" in inspect.signature(api.get_safetensors_metadata).parameters:
        kwargs["timeout"] = HUB_TIMEOUT
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(api.get_safetensors_metadata(repo_id, **kwargs))
        except Exception as error:  # noqa: BLE001 - handed to the caller below
            answers.append(error)

    # huggingface_hub's own requests wait up to 10 s each (its metadata timeout): a Hub that
    # answered for config.json but not for the weights is left behind after HUB_TIMEOUT.
    asking = threading.Thread(target=ask, name="omnifix-safetensors-headers", daemon=True)
    asking.start()
    asking.join(HUB_TIMEOUT)
    found = answers[0] if answers else None
    if isinstance(found, SafetensorsParsingError):
        raise CheckpointError(f"The safetensors headers of {repo_id!r}: {found}. {_FIX}")
    if found is None or isinstance(found, BaseException):  # none there, or no answer: the cache
        return _cached(repo_id, revision)
    found = cast("Any", found)
    files = []
    for name in sorted(found.files_metadata):
        tensors = found.files_metadata[name].tensors
        header = {
            key: {"dtype": info.dtype, "shape": list(info.shape)} for key, info in tensors.items()
        }
        files.append(_tensors(f"{repo_id}/{name}", header))
    return StoredWeights.of(repo_id, files, found.metadata)


def stored_weights(
    source: object,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> StoredWeights | None:
    """What the checkpoint ``source`` (a directory or a Hub id) stores; ``None`` for others.

    Built-in presets (also by their Hub id) are not read: they are stored in bfloat16. A Hub
    repository's ``subfolder`` is not read either (huggingface_hub reads the top level only).

    Raises:
        CheckpointError: A corrupt header or index; the message names the file.
    """
    if not isinstance(source, (str, os.PathLike)):
        return None
    memo = _MEMO.get()
    key = (os.fspath(source), revision, token, subfolder)
    if memo is not None and key in memo:
        return memo[key]
    found = _read(os.fspath(source), revision=revision, token=token, subfolder=subfolder)
    if memo is not None:
        memo[key] = found
    return found


#: Headers read within :func:`remembered`, by source, revision, token and subfolder.
_MEMO: contextvars.ContextVar[dict[tuple[object, ...], StoredWeights | None] | None]
_MEMO = contextvars.ContextVar("omnifix_stored_weights", default=None)


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Within it, each checkpoint's headers are read once: plans of one model in many dtypes.

    Outside it every plan reads them again, so that a checkpoint changed on disk or on the Hub
    is seen. Nested uses share the outermost memo.
    """
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _read(
    source: str, *, revision: str | None, token: str | bool | None, subfolder: str | None
) -> StoredWeights | None:
    # Deferred: the planner imports this module, and omnifix._plan's package imports the planner.
    from omnifix._plan.presets import find_preset

    path = Path(source).expanduser()
    if path.is_dir():
        return read_local(path / (subfolder or ""))
    if not is_hub_id(source) or subfolder or find_preset(source, required=False):
        return None
    return read_hub(source, revision=revision, token=token)
