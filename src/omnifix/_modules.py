"""Input embeddings, accelerate hooks and execution devices, found without hard-coded paths."""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any

from omnifix.errors import UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from torch import nn

__all__ = [
    "execution_device",
    "execution_devices",
    "find_input_embeddings",
    "hook_execution_device",
    "iter_hooks",
    "require_module",
]


def require_module(model: object, caller: str) -> None:
    """Refuse anything but a :class:`torch.nn.Module`, naming the ``caller`` that needs one."""
    from torch import nn

    if isinstance(model, type) and issubclass(model, nn.Module):
        raise UnsupportedModelError(
            f"{caller} needs a model, got the class {model.__name__} itself; pass an instance "
            f"(e.g. the result of {model.__name__}.from_pretrained)."
        )
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"{caller} needs a torch.nn.Module, got {type(model).__name__}; pass the model "
            "itself (e.g. the result of from_pretrained)."
        )


def find_input_embeddings(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """Every token-input embedding of ``model`` as ``(qualified_name, module)``, primary first.

    The primary one receives ``input_ids`` (Qwen2.5-Omni's thinker's; its talker's comes next).
    Only :class:`torch.nn.Embedding` counts: audio and vision towers sometimes answer
    ``get_input_embeddings`` with a convolution, which takes features, not token ids.
    """
    from torch import nn

    names = {id(module): name for name, module in model.named_modules()}
    found: dict[int, tuple[str, nn.Embedding]] = {}

    def add(candidate: object) -> None:
        if isinstance(candidate, nn.Embedding) and id(candidate) in names:
            found.setdefault(id(candidate), (names[id(candidate)], candidate))

    for module in model.modules():  # the model itself first
        getter = getattr(module, "get_input_embeddings", None)
        try:
            add(getter() if callable(getter) else None)
        # transformers raises NotImplementedError for composite models (the full Qwen2.5-Omni
        # class in 5.x), AttributeError where a sub-model lacks the expected attribute, and some
        # remote-code models raise anything at all: every such failure just means "not here".
        except Exception:  # noqa: BLE001, S112
            continue
    if not found:
        # Last resort for models whose getters are all broken: the conventional attribute name.
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == "embed_tokens":
                add(module)
    return list(found.values())


def iter_hooks(module: nn.Module) -> Iterator[Any]:
    """The accelerate hooks attached to ``module`` (a ``SequentialHook`` is flattened)."""
    stack = [getattr(module, "_hf_hook", None)]
    while stack:
        current = stack.pop(0)
        inner = getattr(current, "hooks", None)
        if isinstance(inner, (list, tuple)):
            stack[:0] = list(inner)
        elif current is not None:
            yield current


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on, if a hook says so."""
    import torch

    for hook in iter_hooks(module):
        device = getattr(hook, "execution_device", None)
        if isinstance(device, int):
            # accelerate stores a bare int for "cuda:<int>" (its hooks only get ints on CUDA
            # machines); spell the type out, since torch.device(int) means "current accelerator".
            return torch.device("cuda", device)
        if device is not None:
            return torch.device(device)
    return None


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its hook's device, else its first non-meta tensor's, else None.

    Parameters say it when there are any: a module whose weights are all on ``meta`` was never
    loaded, whatever real buffers it has (a non-persistent ``embed_scale`` is built on the cpu).
    """
    hooked = hook_execution_device(module)
    if hooked is not None:
        return hooked
    own: Iterator[torch.Tensor] = chain(module.parameters(recurse=False), module.parameters())
    if next(module.parameters(), None) is None:  # weightless: its buffers say it
        own = chain(module.buffers(recurse=False), module.buffers())
    return next((tensor.device for tensor in own if not tensor.is_meta), None)


def execution_devices(model: nn.Module) -> set[str]:
    """Where the modules that own weights compute (their hook's device, else their weights')."""
    devices = {
        execution_device(module)
        for module in model.modules()
        if next(module.parameters(recurse=False), None) is not None
    }
    return {str(device) for device in devices if device is not None and device.type != "meta"}
