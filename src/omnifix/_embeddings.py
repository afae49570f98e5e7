"""Pinning input embeddings: ids to the embedding's device, embeddings back to the caller's."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from omnifix._devices import normalize_device
from omnifix._handle import Handle
from omnifix._modules import execution_device, find_input_embeddings, require_module
from omnifix.errors import DeviceError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from omnifix._types import DeviceLike

__all__ = ["EmbeddingPin", "pin_embeddings"]

# The attribute that marks a pinned embedding. It lives in the module's ``__dict__`` (not a
# parameter, buffer or submodule), so it never shows up in ``state_dict`` or ``save_pretrained``.
_STATE_ATTR = "_omnifix_embedding_pin"


class _PinState:
    """One pinned embedding: its return device, its two hooks, their handles, its owners (pins).

    The pre-hook records per thread where the ids came from, for the post-hook. The hooks are
    methods, not closures, so ``copy.deepcopy(model)`` and ``torch.save(model)`` work (the handles
    follow the copied hook dicts); a copy is owned by no pin: ``pin_embeddings(copy).remove()``.
    """

    __slots__ = ("device", "handles", "local", "owners")

    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        self.handles: tuple[RemovableHandle, ...] = ()
        self.owners = 0
        self.local = threading.local()

    def move_ids(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook: remember where the ids are, then move them to where it runs."""
        ids, where = _find_ids(args, kwargs)
        self.local.source = None if ids is None else ids.device
        # Resolved per call (two attribute lookups for an embedding), so re-dispatching the model
        # after pinning, or accelerate hooks added/removed later, are followed.
        target = None if ids is None else execution_device(module)
        if ids is None or target is None or target.type == "meta" or ids.device == target:
            return None
        moved = ids.to(target)
        if isinstance(where, int):
            return (moved, *args[1:]), kwargs
        return args, {**kwargs, where: moved}

    def return_embeddings(
        self, _module: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any
    ) -> Any:
        """Forward hook: the embeddings to the pinned device, else to where the ids came from."""
        import torch

        target = self.device or getattr(self.local, "source", None)
        if target is None or target.type == "meta":
            return None
        if isinstance(output, torch.Tensor):
            return None if output.device == target else output.to(target)
        # Embedding subclasses returning tuples or dicts: accelerate already walks nested outputs.
        from accelerate.utils import send_to_device

        return send_to_device(output, target)

    def __getstate__(self) -> tuple[torch.device | None, tuple[RemovableHandle, ...]]:
        return self.device, self.handles

    def __setstate__(self, state: tuple[torch.device | None, tuple[RemovableHandle, ...]]) -> None:
        self.device, self.handles = state
        self.owners = 0
        self.local = threading.local()


def _find_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, Any]:
    """The ids tensor of an embedding call and where it was: a positional index or a kwarg name."""
    import torch

    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    # ``nn.Embedding.forward(input)``; subclasses (scaled embeddings) may call it ``input_ids``.
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return value, key
    return None, None


class EmbeddingPin(Handle):
    """Handle returned by :func:`omnifix.pin_embeddings` (see :class:`omnifix.types.Handle`).

    Pins are reference counted per embedding: pinning an already pinned embedding adds no hook
    but one owner, and the hooks go when the last owner is removed, so removing a second pin
    never unpins what an earlier one still holds. The handle refers to the embeddings weakly.
    """

    __slots__ = ("_device", "_entries")

    def __init__(
        self, entries: list[tuple[str, nn.Module, _PinState]], device: torch.device | None
    ) -> None:
        """The pinned embeddings (name, module, state) and the return device."""
        super().__init__()
        self._entries = tuple((name, weakref.ref(module), state) for name, module, state in entries)
        self._device = device

    @property
    def modules(self) -> tuple[str, ...]:
        """Qualified names (in the pinned model) of the embeddings this handle pinned."""
        return tuple(name for name, _, _ in self._entries)

    @property
    def device(self) -> torch.device | None:
        """Where embeddings are returned; ``None`` means "the device the ids came from"."""
        return self._device

    def _undo(self) -> None:
        # Removal deletes exactly the two hooks the pin added: the hook dicts are as before.
        for _, ref, state in self._entries:
            module = ref()
            if module is None or module.__dict__.get(_STATE_ATTR) is not state:
                continue
            state.owners -= 1
            if state.owners <= 0:
                for handle in state.handles:
                    handle.remove()
                del module.__dict__[_STATE_ATTR]

    def __repr__(self) -> str:
        """Name the pinned embeddings, the target device and whether the pin is active."""
        return (
            f"EmbeddingPin(modules={self.modules!r}, device={self._device!r}, active={self.active})"
        )


def pin_embeddings(model: nn.Module, *, device: DeviceLike = None) -> EmbeddingPin:
    """Make every input embedding of ``model`` safe to call with ids on any device.

    Each input embedding (``get_input_embeddings()`` where it works, else the ``embed_tokens`` of
    every language model inside a composite model, e.g. Qwen2.5-Omni's thinker and talker) gets
    two forward hooks: before the lookup the ids move to where the embedding runs (accelerate's
    hook device, else its weight's, read at call time); after it the embeddings move to
    ``device``, or back to where the ids came from, so the multimodal merge that follows sees one
    device. Nothing is replaced: ``state_dict()``, tied weights and ``save_pretrained`` are as
    before, and accelerate's hooks keep working inside ours, whether added before or after.
    Pinning twice adds no hook (see :class:`omnifix.types.EmbeddingPin` for who owns what).

    Args:
        model: Any ``nn.Module`` with token embeddings; usually a transformers model.
        device: Where to return the embeddings. ``None`` (default): the device the ids came from.

    Returns:
        The handle, whose ``.modules`` names the pinned embeddings; ``.remove()`` (or leaving a
        ``with`` block) unpins.

    Raises:
        UnsupportedModelError: ``model`` is not an ``nn.Module`` or has no input embedding.
        DeviceError: ``device`` is not a device, or an embedding is already pinned to another one.

    Example:
        >>> import torch, omnifix
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> model = Qwen2ForCausalLM(config)
        >>> with omnifix.pin_embeddings(model) as pin:
        ...     pin.modules
        ...     model(torch.tensor([[1, 2, 3]])).logits.device
        ('model.embed_tokens',)
        device(type='cpu')
        >>> pin
        EmbeddingPin(modules=('model.embed_tokens',), device=None, active=False)
    """
    from torch import nn

    require_module(model, "pin_embeddings")
    target = None if device is None else normalize_device(device)
    found: list[tuple[str, nn.Module]] = list(find_input_embeddings(model))
    if not found and isinstance(model, nn.Embedding):
        # pin_embeddings(model.get_input_embeddings()): the embedding, named "" as a root.
        found = [("", model)]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no input embedding: get_input_embeddings() returns no "
            "nn.Embedding on it or on any submodule, and no submodule is named embed_tokens; "
            "pass the model (or language model) that owns the token embedding."
        )
    # Check every embedding before touching any, so a refused call pins nothing.
    for name, embedding in found:
        existing = embedding.__dict__.get(_STATE_ATTR)
        if existing is not None and existing.device != target:
            raise DeviceError(
                f"{name} is already pinned with device={existing.device!r}, so it cannot also "
                f"return embeddings to device={target!r}; remove the earlier pin first "
                f"(handle.remove()) or pin with device={existing.device!r}."
            )
    entries: list[tuple[str, nn.Module, _PinState]] = []
    for name, embedding in found:
        state = embedding.__dict__.get(_STATE_ATTR)
        if state is None:
            state = _PinState(target)
            # The pre-hook goes first and the post-hook last, so the pin wraps every hook
            # already there: those see ids and embeddings where the embedding computes.
            state.handles = (
                embedding.register_forward_pre_hook(state.move_ids, with_kwargs=True, prepend=True),
                embedding.register_forward_hook(state.return_embeddings, with_kwargs=True),
            )
            embedding.__dict__[_STATE_ATTR] = state
        state.owners += 1
        entries.append((name, embedding, state))
    return EmbeddingPin(entries, target)
