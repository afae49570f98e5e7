"""Finding things inside a model: input embeddings, accelerate hooks, execution devices.

Nothing here hard-codes a module path (the Qwen layouts differ between transformers 4.45-4.51,
4.52+ and 5.x): the model is asked (``get_input_embeddings``), then walked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
]


def _try_get_input_embeddings(module: nn.Module) -> nn.Module | None:
    getter = getattr(module, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    # transformers raises NotImplementedError for composite models (the full Qwen2.5-Omni
    # class in 5.x), AttributeError where a sub-model lacks the expected attribute, and some
    # remote-code models raise anything at all: every such failure just means "not here".
    except Exception:  # noqa: BLE001
        return None
    from torch import nn

    return found if isinstance(found, nn.Module) else None


def find_input_embeddings(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """Every token-input embedding of ``model`` as ``(qualified_name, module)``, primary first.

    The primary embedding is the one that receives the caller's ``input_ids`` (for
    Qwen2.5-Omni, the thinker's); further entries are embeddings of other language models
    inside a composite model (Omni's talker). Only :class:`torch.nn.Embedding` modules count:
    audio and vision towers sometimes answer ``get_input_embeddings`` with a convolution, which
    takes features, not token ids.
    """
    from torch import nn

    names = {id(module): name for name, module in model.named_modules()}
    found: dict[int, tuple[str, nn.Embedding]] = {}

    def add(candidate: nn.Module | None) -> None:
        if isinstance(candidate, nn.Embedding) and id(candidate) in names:
            found.setdefault(id(candidate), (names[id(candidate)], candidate))

    add(_try_get_input_embeddings(model))
    for _, module in model.named_modules():
        if module is not model:
            add(_try_get_input_embeddings(module))
    if not found:
        # Last resort for models whose getters are all broken: the conventional attribute name.
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == "embed_tokens":
                add(module)
    return list(found.values())


def iter_hooks(module: nn.Module) -> Iterator[Any]:
    """The accelerate hooks attached to ``module`` (a ``SequentialHook`` is flattened)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    stack = [hook]
    while stack:
        current = stack.pop(0)
        inner = getattr(current, "hooks", None)
        if isinstance(inner, (list, tuple)):
            stack[:0] = list(inner)
        else:
            yield current


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on, if a hook says so."""
    import torch

    for hook in iter_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            if isinstance(device, torch.device):
                return device
            # accelerate stores a bare int for "cuda:<int>" (its hooks only get ints on CUDA
            # machines); spell the type out, since torch.device(int) means "current accelerator".
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its hook's execution device, else its first real tensor's device.

    Returns ``None`` when every tensor of the module is on ``meta`` and no hook says where it runs.
    """
    hooked = hook_execution_device(module)
    if hooked is not None:
        return hooked
    for tensor in _own_then_all_tensors(module):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def _own_then_all_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    yield from module.parameters()
    yield from module.buffers()


def execution_devices(model: nn.Module) -> set[str]:
    """Where the modules that own weights compute (their hook's device, else their weights')."""
    found: set[str] = set()
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        device = execution_device(module)
        if device is not None and device.type != "meta":
            found.add(str(device))
    return found
