"""bitsandbytes weights: what a plan proposes, what transformers replaces, and what it stores.

A :class:`Quantization` is read from what the user passes (``"int8"``, ``"nf4"``, ``"fp4"`` or a
``BitsAndBytesConfig``), becomes the ``BitsAndBytesConfig`` a load passes to ``from_pretrained``,
and resizes a skeleton: every module that transformers' ``replace_with_bnb_linear`` replaces
(``nn.Linear`` and GPT-2's ``Conv1D``, less the skip modules) stores its weight as bitsandbytes
does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from omnifix._compat import bnb_converts, bnb_default_skips, installed_version
from omnifix._plan.skeleton import build_on_meta, load_skeleton, module_sizes
from omnifix.errors import (
    InvalidArgumentError,
    QuantizationUnavailableError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    import torch

    from omnifix._plan.skeleton import Skeleton

__all__ = ["Method", "Quantization", "bnb_config", "proposed_skips", "quantize"]
__all__ += ["require_bitsandbytes", "resolve_quantization", "stored_quantization"]

#: The bitsandbytes methods a plan sizes: LLM.int8, and 4-bit NormalFloat or FloatPoint.
Method = Literal["int8", "nf4", "fp4"]
#: Values per 4-bit quantisation block (one absmax each) and blocks per second-level block
#: (double quantisation), as bitsandbytes' ``quantize_4bit`` cuts them.
_BLOCK: Final = 64
_NESTED_BLOCK: Final = 256
#: Entries of the 4-bit code (NF4/FP4) and of the nested 8-bit dynamic map, fp32 each.
_CODE: Final = 16
_NESTED_CODE: Final = 256
_FP32: Final = 4


@dataclass(frozen=True)
class Quantization:
    """A bitsandbytes quantisation, as a plan sizes and proposes it.

    Attributes:
        method: ``"int8"`` (``load_in_8bit``), ``"nf4"`` or ``"fp4"`` (``load_in_4bit``).
        double_quant: 4-bit only: quantise the absmax constants too
            (``bnb_4bit_use_double_quant``).
        skip_modules: Modules kept in the model's dtype (``llm_int8_skip_modules``); ``None``:
            transformers' default (the output and tied embeddings).
    """

    method: Method
    double_quant: bool = False
    skip_modules: tuple[str, ...] | None = None

    @property
    def bits(self) -> int:
        """8 or 4."""
        return 8 if self.method == "int8" else 4

    def describe(self) -> str:
        """``nf4 with double quantisation, keeping lm_head, model.visual unquantised``."""
        text = self.method + (" with double quantisation" if self.double_quant else "")
        if self.skip_modules:
            text += f", keeping {', '.join(self.skip_modules)} unquantised"
        return text

    def config(self, dtype: torch.dtype) -> Any:
        """The ``transformers.BitsAndBytesConfig`` that loads this (compute in ``dtype``).

        Raises:
            QuantizationUnavailableError: This transformers checks for bitsandbytes when the
                config is built (4.x for 4-bit), and it is not installed.
        """
        import transformers

        factory: Any = transformers.BitsAndBytesConfig  # untyped in transformers
        try:
            return factory(**self._arguments(dtype))
        except ImportError as error:  # PackageNotFoundError: 4.x checks the installed version
            raise QuantizationUnavailableError(
                f"transformers {transformers.__version__} builds a {self.bits}-bit "
                f"BitsAndBytesConfig only with bitsandbytes installed ({error}). Fix: pip "
                "install bitsandbytes, or use plan.to_dict()['quantization_config']."
            ) from None

    def arguments(self, dtype: torch.dtype) -> dict[str, Any]:
        """The ``BitsAndBytesConfig`` keywords, JSON-ready (the compute dtype by name)."""
        return {
            key: str(value).removeprefix("torch.") if key.endswith("dtype") else value
            for key, value in self._arguments(dtype).items()
        }

    def code(self, dtype: torch.dtype) -> str:
        """:meth:`config` as Python source, e.g. ``transformers.BitsAndBytesConfig(...)``."""
        parts = []
        for key, value in self._arguments(dtype).items():
            text = f"torch.{str(value).removeprefix('torch.')}" if key.endswith("dtype") else None
            parts.append(f"{key}={text or repr(value)}")
        return f"transformers.BitsAndBytesConfig({', '.join(parts)})"

    def _arguments(self, dtype: torch.dtype) -> dict[str, Any]:
        arguments: dict[str, Any]
        if self.method == "int8":
            arguments = {"load_in_8bit": True}
        else:
            arguments = {"load_in_4bit": True, "bnb_4bit_quant_type": self.method}
            if self.double_quant:
                arguments["bnb_4bit_use_double_quant"] = True
            arguments["bnb_4bit_compute_dtype"] = dtype
        if self.skip_modules is not None:
            arguments["llm_int8_skip_modules"] = list(self.skip_modules)
        return arguments

    def stored_bytes(self, numel: int, rows: int) -> int:
        """Bytes bitsandbytes keeps for a weight of ``numel`` values in ``rows`` output rows.

        int8: one byte a value and an fp32 scale per row (``SCB``). 4-bit: two values a byte and
        an fp32 absmax per block of 64, or with double quantisation a byte per block plus an
        fp32 absmax per 256 blocks and the nested code; the 4-bit code itself.
        """
        if self.method == "int8":
            return numel + _FP32 * rows
        blocks = math.ceil(numel / _BLOCK)
        packed = math.ceil(numel / 2) + _FP32 * _CODE
        if not self.double_quant:
            return packed + _FP32 * blocks
        nested = _FP32 * (math.ceil(blocks / _NESTED_BLOCK) + _NESTED_CODE + 1)  # + the offset
        return packed + blocks + nested


def _from_config(value: Any) -> Quantization:
    """A ``BitsAndBytesConfig``, or its dict as ``config.json`` stores it."""

    def field(name: str, default: object = None) -> Any:
        if isinstance(value, dict):
            return value.get(name, value.get(f"_{name}", default))
        return getattr(value, name, default)

    if field("load_in_8bit"):
        method: str = "int8"
    elif field("load_in_4bit"):
        method = str(field("bnb_4bit_quant_type", "fp4"))
    else:
        method = ""
    if method not in get_args(Method):
        raise InvalidArgumentError(
            f"The BitsAndBytesConfig loads neither 8-bit nor 4-bit (nf4/fp4) weights: {value!r}. "
            "Pass load_in_8bit=True, or load_in_4bit=True with bnb_4bit_quant_type='nf4'."
        )
    skips = field("llm_int8_skip_modules", None)
    return Quantization(
        method,  # type: ignore[arg-type]
        double_quant=bool(field("bnb_4bit_use_double_quant")) and method != "int8",
        skip_modules=None if skips is None else tuple(str(skip) for skip in skips),
    )


def proposed_skips(skeleton: Skeleton) -> tuple[str, ...]:
    """What omnifix keeps unquantised: transformers' defaults, lm_head, every vision/audio tower.

    transformers' defaults (output and tied embeddings, the last module) miss the language
    model's head where the top model has no output embeddings (Qwen2.5-Omni's thinker).
    """
    skips = list(bnb_default_skips(skeleton.model))
    skips += [skeleton.anatomy.lm_head] if skeleton.anatomy.lm_head else []
    # A tower's blocks are "<tower>.blocks" or "<tower>.layers": the tower is their owner.
    skips += [tower.name.rpartition(".")[0] for tower in skeleton.anatomy.towers]
    return tuple(dict.fromkeys(skip for skip in skips if skip))


def resolve_quantization(value: object, skeleton: Skeleton) -> Quantization | None:
    """The quantisation of ``value``: ``None``, ``"int8"``, ``"nf4"``, ``"fp4"``, a config.

    Names keep transformers' defaults and every vision/audio tower unquantised, and use double
    quantisation for 4 bits; a ``BitsAndBytesConfig`` is taken as it is.

    Raises:
        InvalidArgumentError: Anything else (another quantisation method, a misspelt name).
    """
    if value is None or isinstance(value, Quantization):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        aliases = {"8bit": "int8", "int4": "nf4", "4bit": "nf4"}
        name = aliases.get(name, name)
        if name not in get_args(Method):
            raise InvalidArgumentError(
                f"quantization={value!r} is not a bitsandbytes method omnifix plans. Pass "
                "'int8', 'nf4' or 'fp4', or a transformers.BitsAndBytesConfig."
            )
        return Quantization(
            name,  # type: ignore[arg-type]
            double_quant=name != "int8",
            skip_modules=proposed_skips(skeleton),
        )
    if type(value).__name__ == "BitsAndBytesConfig":
        return _from_config(value)
    raise InvalidArgumentError(
        f"quantization={value!r} ({type(value).__name__}): omnifix plans bitsandbytes weights "
        "only. Pass 'int8', 'nf4', 'fp4' or a transformers.BitsAndBytesConfig."
    )


def stored_quantization(config: Any) -> tuple[object, str | None]:
    """A checkpoint's own quantisation (``config.json``'s ``quantization_config``).

    Returns ``(quantization, method)``: the :class:`Quantization` to plan with for a
    bitsandbytes checkpoint (``None`` for none), and the method's name where omnifix cannot size
    it (GPTQ, AWQ, ...), else ``None``.
    """
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None, None
    data = stored if isinstance(stored, dict) else stored.to_dict()
    method = str(data.get("quant_method", "unknown"))
    if method != "bitsandbytes":
        return None, method
    return _from_config(data), None


def bnb_config(value: object, config: Any, model_class: type, dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` that loads ``value`` for ``config``'s model in ``dtype``.

    ``value`` as :func:`resolve_quantization` reads it; ``None`` for ``None``.
    """
    skeleton = load_skeleton(config, model_class=model_class, dtype=dtype)
    resolved = resolve_quantization(value, skeleton)
    return None if resolved is None else resolved.config(dtype)


def quantize(skeleton: Skeleton, quantization: Quantization) -> Skeleton:
    """``skeleton`` with every weight that bitsandbytes replaces stored as it stores it.

    The modules are those transformers' ``replace_with_bnb_linear`` converts, asked of the
    installed transformers' own rule (:func:`omnifix._compat.bnb_converts`).

    Raises:
        UnsupportedModelError: The skeleton has no config to rebuild it from (a built model).
    """
    import torch
    from torch import nn

    if skeleton.config is None:
        raise UnsupportedModelError(
            f"Cannot plan {skeleton.label} with quantised weights: it was passed as a built "
            "model. Pass its config (or checkpoint directory) to plan_placement instead."
        )
    model = build_on_meta(skeleton.config, skeleton.model_class, skeleton.dtype)
    skips = quantization.skip_modules
    patterns = list(bnb_default_skips(model) if skips is None else skips)
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    dequantized = []
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if weight is None or not bnb_converts(name, module, patterns):
            continue
        rows = weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[-1]
        stored = quantization.stored_bytes(weight.numel(), rows)
        dequantized.append((name, weight.numel() * skeleton.dtype.itemsize))
        module._parameters["weight"] = nn.Parameter(  # noqa: SLF001 - sizing only, never run
            torch.empty(stored, dtype=torch.uint8, device="meta"), requires_grad=False
        )
    return replace(
        skeleton,
        label=skeleton.label,
        model=model,
        sizes=module_sizes(model),
        streamed=(),  # bitsandbytes weights are not offloaded (see plan_placement)
        dequantized=tuple(sorted(dequantized, key=lambda item: -item[1])),
    )


def require_bitsandbytes(what: str, *, device_types: set[str]) -> None:
    """Raise unless the installed bitsandbytes loads ``what`` on ``device_types``.

    bitsandbytes says itself which torch device types it supports.

    Raises:
        QuantizationUnavailableError: bitsandbytes is missing, broken, or without a backend for
            one of ``device_types`` (the cpu before its multi-backend releases).
    """
    import importlib

    try:
        bnb: Any = importlib.import_module("bitsandbytes")
    except Exception as error:  # noqa: BLE001 - missing, or a broken native library
        raise QuantizationUnavailableError(
            f"Loading {what} needs bitsandbytes, which cannot be imported here ({error}). Fix: "
            "pip install -U bitsandbytes, or load without quantization."
        ) from None
    supported = set(getattr(bnb, "supported_torch_devices", None) or {"cuda"})
    missing = sorted(device_types - supported)
    if missing:
        version = installed_version("bitsandbytes")
        raise QuantizationUnavailableError(
            f"Loading {what} on {', '.join(missing)} needs a bitsandbytes that supports it; "
            f"bitsandbytes {version} supports {', '.join(sorted(supported))}. Fix: pip install "
            "-U bitsandbytes (recent releases run on the cpu too), or load on a GPU."
        )
