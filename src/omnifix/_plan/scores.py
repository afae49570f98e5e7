"""What a model's own eager attention holds per score, found by running it on fake tensors.

Eager attention materialises ``batch x heads x queries x keys`` scores, and what each score costs
at the peak depends on the installed code: Llama-style attention scales out of place and takes
the softmax in fp32 before casting back (10 bytes per bf16 score), T5 and Whisper take it in the
model's dtype (4 bytes). Rather than a constant per family, the planner asks the code: it calls
the module's ``eager_attention_forward`` (the layout transformers' attention interface uses) on
fake tensors of three lengths, counts the bytes of every tensor alive after each operation, and
solves for the part that grows with the square of the length. Fake tensors allocate nothing, so
this takes milliseconds at any size. Code without that function (older layouts) gets the
calibrated constant.
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch
    from torch import nn

__all__ = ["eager_function", "eager_score_bytes", "live_bytes", "takes_position_bias"]

#: Query/key lengths of the probe; three solve ``a L^2 + b L + c`` exactly.
_LENGTHS: Final = (32, 64, 128)
_HEAD_DIM: Final = 4


def eager_function(attention: nn.Module | None) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` of ``attention``'s modeling module, if it has one."""
    if attention is None:
        return None
    module = sys.modules.get(type(attention).__module__)
    function = getattr(module, "eager_attention_forward", None)
    return function if callable(function) else None


def takes_position_bias(attention: nn.Module | None) -> bool:
    """Whether the eager function takes a relative position bias apart from the mask.

    Where it does (T5 on transformers 5), the bias is computed once per forward pass without the
    batch dimension and added inside each call; older code folded the mask into it, one
    ``batch x heads x L^2`` tensor kept for every layer.
    """
    function = eager_function(attention)
    return function is not None and "position_bias" in inspect.signature(function).parameters


def eager_score_bytes(
    attention: nn.Module | None, dtype: torch.dtype, *, cuda: bool, heads: int, kv_heads: int
) -> float | None:
    """Bytes per score that ``attention``'s eager code holds at its peak, or ``None``.

    ``None`` where the module has no ``eager_attention_forward`` or the probe cannot run it
    (the caller then uses the calibrated constant). ``cuda``: count as torch's CUDA softmax
    computes, which reads fp16 and writes fp32 in one kernel where the cpu makes an fp32 copy.
    ``heads`` and ``kv_heads``: the model's, so that what the code copies per head (repeated
    keys and values) and per sample (the mask) falls on each score as it does in the model.

    Example:
        >>> import torch
        >>> from omnifix._plan.anatomy import describe
        >>> from omnifix._plan.skeleton import build_skeleton
        >>> attention = describe(build_skeleton("qwen2-vl-7b")).text.attention
        >>> cost = eager_score_bytes(attention, torch.bfloat16, cuda=True, heads=28, kv_heads=4)
        >>> cost is None or 10 <= cost < 11  # None: the installed code has no eager function
        True
    """
    if attention is None or eager_function(attention) is None:
        return None
    groups = getattr(attention, "num_key_value_groups", None)  # what the code repeats keys by
    if isinstance(groups, int) and groups > 0 and heads % groups == 0:
        kv_heads = heads // groups
    kv_heads = kv_heads if kv_heads > 0 and heads % kv_heads == 0 else heads
    config = getattr(attention, "config", None)
    to_json = getattr(config, "to_json_string", None)
    settings = str(to_json(use_diff=False)) if callable(to_json) else ""
    key = (type(attention), heads, kv_heads, dtype, cuda, settings)
    if key not in _PROBED:
        if len(_PROBED) >= _PROBES_KEPT:
            _PROBED.pop(next(iter(_PROBED)))
        _PROBED[key] = _probe(attention, heads, kv_heads, dtype, cuda=cuda)
    return _PROBED[key]


#: Probe results by attention class, heads, dtype, device kind and config (the code path may
#: depend on config values, such as a softcap).
_PROBED: dict[tuple[type, int, int, Any, bool, str], float | None] = {}
_PROBES_KEPT: Final = 256


def _probe(
    attention: nn.Module, heads: int, kv_heads: int, dtype: torch.dtype, *, cuda: bool
) -> float | None:
    function = eager_function(attention)
    if function is None:
        return None
    module = copy.copy(attention)  # a shallow copy: the skeleton's own module stays as it is
    module.training = False
    call = _Call(function, module, (heads, kv_heads), takes_position_bias(attention), dtype)
    peaks = []
    for length in _LENGTHS:
        peak = _peak(call, length, cuda=cuda)
        if peak is None:
            return None
        peaks.append(peak)
    (l1, l2, l3), (p1, p2, p3) = _LENGTHS, peaks
    # Second divided difference: the L^2 coefficient of the peak, per score of one head.
    slope1, slope2 = (p2 - p1) / (l2 - l1), (p3 - p2) / (l3 - l2)
    per_square = (slope2 - slope1) / (l3 - l1)
    if per_square < 0:  # not a peak that grows with the scores: nothing to learn from it
        return None
    return round(per_square / heads, 2)


class _Call(NamedTuple):
    """One probe's eager function, the module it is called with, and its inputs' shape."""

    function: Callable[..., Any]
    module: nn.Module
    heads: tuple[int, int]
    position_bias: bool
    dtype: torch.dtype


def _peak(call: _Call, length: int, *, cuda: bool) -> int | None:
    """The most bytes alive at once while the eager function runs at ``length`` (fake tensors)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    heads, kv_heads = call.heads
    kwargs: dict[str, Any] = {"dropout": 0.0, "scaling": _HEAD_DIM**-0.5}
    try:
        # Outside inference mode, composite operations (softmax with a dtype, matmul) reach the
        # dispatch mode as the kernels they run, temporary copies included; inside it a caller's
        # inference mode would hide them.
        # Buffers the code reads (GPT-2's causal mask on 4.x) are real: they become fake as used.
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with warnings.catch_warnings(), torch.inference_mode(mode=False), fake:
            warnings.simplefilter("ignore")

            def make(*shape: int) -> torch.Tensor:
                return torch.zeros(shape, dtype=call.dtype)

            query = make(1, heads, length, _HEAD_DIM)
            key, value = make(1, kv_heads, length, _HEAD_DIM), make(1, kv_heads, length, _HEAD_DIM)
            mask = make(1, 1, length, length)
            if call.position_bias:
                kwargs["position_bias"] = make(1, heads, length, length)
            live = live_bytes()  # buffers the code slices count at every length: they cancel
            with _cuda_softmax(enabled=cuda), live:
                call.function(call.module, query, key, value, mask, **kwargs)
    except Exception:  # noqa: BLE001 - code the probe cannot run falls back to the constant
        return None
    peak: int = live.peak
    return peak


def live_bytes(known: Iterable[torch.Tensor] = ()) -> Any:
    """A dispatch mode that counts the bytes of the tensors each operation creates, while alive.

    Each new storage is counted once, from the operation that made it until it is freed (a
    finalizer on the storage object, which torch keeps as long as the storage lives); ``.peak``
    is the most at once. Tensors made before the mode was entered are not counted, nor are views
    of ``known`` ones (a model's parameters and buffers: the code slices a causal-mask buffer).

    Example:
        >>> import torch
        >>> with live_bytes() as live:
        ...     a = torch.zeros(256)  # 1 KiB
        ...     b = a * 2  # 1 KiB more
        ...     del a, b
        >>> live.peak, live.now
        (2048, 0)
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    existing = {tensor.untyped_storage()._cdata: 0 for tensor in known}  # noqa: SLF001

    class Live(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's class is untyped
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.sizes: dict[int, int] = dict(existing)
            self.now = 0
            self.peak = 0

        def _free(self, key: int) -> None:
            self.now -= self.sizes.pop(key, 0)

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = storage._cdata  # noqa: SLF001 - the storage's identity while it lives
                if key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
            self.peak = max(self.peak, self.now)
            return out

    return Live()


def _cuda_softmax(*, enabled: bool) -> Any:
    """Take fp16 softmaxes into fp32 as torch's CUDA kernel does: one kernel, no fp32 copy.

    On the cpu, ``softmax(x, dtype=torch.float32)`` copies an fp16 ``x`` to fp32 first; torch's
    CUDA softmax reads fp16 and writes fp32 directly (``_softmax(x, dim, half_to_float=True)``,
    Half only). The probe runs on fake cpu tensors, so it calls that kernel itself.
    """
    import contextlib

    import torch
    from torch.overrides import TorchFunctionMode

    if not enabled:
        return contextlib.nullcontext()
    softmaxes = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}

    class CudaSoftmax(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            if func in softmaxes and args and kwargs.get("dtype") == torch.float32:
                tensor, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else -1)
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float16:
                    return torch.ops.aten._softmax(tensor, dim, half_to_float=True)  # noqa: SLF001
            return func(*args, **kwargs)

    return CudaSoftmax()
