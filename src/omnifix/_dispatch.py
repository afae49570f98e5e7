"""Lean dispatch: hooks only where a tensor must cross a device (docs/dispatch.md)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from omnifix._copies import check_copies
from omnifix._device_map import OFFLOAD_TARGETS, Placement, check_map, locate, place_order, spell
from omnifix._devices import normalize_map
from omnifix._handle import Handle
from omnifix._modules import find_input_embeddings, iter_hooks, require_module
from omnifix.errors import DeviceError, InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    #: A device_map entry that names a module: its name, the module, where it computes.
    Entry: TypeAlias = tuple[str, nn.Module, torch.device]
    Hooked: TypeAlias = list[tuple[nn.Module, object]]
    Call: TypeAlias = tuple[tuple[Any, ...], dict[str, Any]]

__all__ = ["LeanDispatch", "lean_dispatch"]

#: Keyword arguments never moved, whatever the model says: the KV cache stays where each layer
#: wrote it (accelerate's hooks skip them too, through ``_skip_keys_device_placement``).
_SKIP_KEYS: Final = frozenset({"past_key_values", "past_key_value"})
#: How the fix reads in every refusal of an offloaded map.
_OFFLOAD_FIX: Final = (
    'Fix: keep accelerate\'s hooks for offloaded models (load_safely(..., hooks="accelerate"), '
    "or do not call lean_dispatch on them), or give a device_map without 'cpu'/'disk' entries."
)

# The handle in charge of each model, weakly keyed; a new lean_dispatch of it removes the old one.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, LeanDispatch] = weakref.WeakKeyDictionary()


def _version(tensor: torch.Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) keep no version counter; in-place
    # changes of them are not seen, which is why the memo only lives for one forward pass.
    return -1 if tensor.is_inference() else tensor._version  # noqa: SLF001 - torch's own counter


class _Memo:
    """Copies made during the current forward: one per (source tensor, target device).

    Keyed weakly by the source, so entries die with it even when no root hook clears the memo (a
    sub-model called directly); a copy is reused only while neither it nor its source changed.
    """

    __slots__ = ("copies",)

    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self.copies: Any = WeakIdKeyDictionary()

    def move(self, tensor: torch.Tensor, target: torch.device) -> torch.Tensor:
        version = _version(tensor)
        per_device: dict[torch.device, tuple[int, torch.Tensor, int]]
        per_device = self.copies.setdefault(tensor, {})
        hit = per_device.get(target)
        if hit is not None and hit[0] == version and _version(hit[1]) == hit[2]:
            return hit[1]
        moved = tensor.to(target)
        per_device[target] = (version, moved, _version(moved))
        return moved

    def clear(self) -> None:
        self.copies.clear()

    # Copies of a model (copy.deepcopy) get a fresh, empty memo, shared by the copied hooks.
    def __reduce__(self) -> tuple[type[_Memo], tuple[()]]:
        return _Memo, ()


def _move_value(
    value: Any, target: torch.device, memo: _Memo | None, tensor_type: type[torch.Tensor]
) -> Any:
    """A tensor, or a plain tuple/list's tensors, on ``target``: ``value`` itself if none moved.

    Anything else (a Cache, a dict, a named tuple, None) comes back as it is.
    """
    if isinstance(value, tensor_type):
        if value.device == target:
            return value
        return value.to(target) if memo is None else memo.move(value, target)
    kind = type(value)
    if kind is not tuple and kind is not list:
        return value
    # One level only (``position_embeddings`` is ``(cos, sin)``); a tuple of tuples (a legacy KV
    # cache) is left alone. Look first (a loop: cheaper than any()), so as to build nothing.
    for item in value:
        if isinstance(item, tensor_type) and item.device != target:
            break
    else:
        return value
    return kind(
        _move_value(item, target, memo, tensor_type) if isinstance(item, tensor_type) else item
        for item in value
    )


def _make_current(index: int) -> int:
    """Make GPU ``index`` the current CUDA device; returns the one that was current.

    An op on another GPU's tensor switches devices twice (torch's device guard), for every kernel
    of every step: each entry makes its GPU current once, and the root hook restores the caller's.
    """
    import torch

    current = torch.cuda.current_device()
    if current != index:
        torch.cuda.set_device(index)
    return current


class _EntryHook:
    """Pre-forward hook of one device_map entry: move what arrives from another device.

    accelerate's ModelHook protocol, without subclassing it (that would import accelerate and
    torch with omnifix): add_hook_to_module only calls init_hook, pre_forward, post_forward,
    detach_hook and reads no_grad; nothing in accelerate or transformers checks the class.
    """

    no_grad = False

    __slots__ = ("cuda_index", "execution_device", "memo", "skip", "tensor_type")

    def __init__(self, execution_device: torch.device, memo: _Memo, skip: frozenset[str]) -> None:
        import torch

        # Named like accelerate's AlignDevicesHook attribute, so omnifix.input_device,
        # placement_report and transformers' own readers of `_hf_hook.execution_device` see it.
        self.execution_device = execution_device
        self.memo = memo
        self.tensor_type = torch.Tensor  # held, so that the hot path imports nothing
        self.skip = skip
        # The GPU to make current before the entry computes; hooks carry indexed devices.
        cuda = execution_device.type == "cuda" and torch.cuda.is_available()
        self.cuda_index = execution_device.index if cuda else None

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module

    def move(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        """``args`` and ``kwargs``, copied only where a tensor moved (plain loops: the cheapest)."""
        target, memo, tensor_type = self.execution_device, self.memo, self.tensor_type
        moved_args = args
        for index, value in enumerate(args):
            moved = _move_value(value, target, memo, tensor_type)
            if moved is not value:
                moved_args = (*moved_args[:index], moved, *moved_args[index + 1 :])
        moved_kwargs = kwargs
        for key, value in kwargs.items():
            moved = value if key in self.skip else _move_value(value, target, memo, tensor_type)
            if moved is not value:
                moved_kwargs = {**moved_kwargs, key: moved}
        return moved_args, moved_kwargs

    def pre_forward(self, _module: nn.Module, *args: Any, **kwargs: Any) -> Call:
        moved = self.move(args, kwargs)
        if self.cuda_index is not None:
            _make_current(self.cuda_index)
        return moved

    def post_forward(self, _module: nn.Module, output: Any) -> Any:
        return output

    def detach_hook(self, module: nn.Module) -> nn.Module:
        return module

    def __repr__(self) -> str:
        return f"LeanEntryHook(execution_device={self.execution_device})"


_RootState = tuple["torch.device", _Memo, frozenset[str], "RemovableHandle | None"]


class _RootHook(_EntryHook):
    """The model's hook: inputs to the embedding's device, outputs back to the caller's."""

    __slots__ = ("local", "restore")

    def __init__(self, execution_device: torch.device, memo: _Memo, skip: frozenset[str]) -> None:
        super().__init__(execution_device, memo, skip)
        # Per thread: the caller's device (set before, read after) and current CUDA device.
        self.local = threading.local()
        self.restore: RemovableHandle | None = None

    def init_hook(self, module: nn.Module) -> nn.Module:
        # The entries make their GPU the current CUDA device; the caller's comes back after the
        # forward through a torch forward hook with always_call=True, which (unlike accelerate's
        # post_forward) also runs when the forward raises.
        if self.cuda_index is not None:
            self.restore = module.register_forward_hook(self.restore_current, always_call=True)
        return module

    def detach_hook(self, module: nn.Module) -> nn.Module:
        if self.restore is not None:
            self.restore.remove()
            self.restore = None
        return module

    def restore_current(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        current: int | None = getattr(self.local, "current", None)
        if current is not None:
            self.local.current = None
            _make_current(current)

    def pre_forward(self, _module: nn.Module, *args: Any, **kwargs: Any) -> Call:
        self.memo.clear()
        # The caller's device: its first top-level tensor (or tensor in a tuple/list).
        values = [*args, *(value for key, value in kwargs.items() if key not in _SKIP_KEYS)]
        nested = [item for value in values if type(value) in (tuple, list) for item in value]
        tensors = (item for item in (*values, *nested) if isinstance(item, self.tensor_type))
        self.local.caller = next((tensor.device for tensor in tensors), None)
        if self.cuda_index is not None:
            self.local.current = _make_current(self.cuda_index)
        return self.move(args, kwargs)

    def post_forward(self, _module: nn.Module, output: Any) -> Any:
        self.memo.clear()
        caller: torch.device | None = getattr(self.local, "caller", None)
        if caller is None:
            return output
        tensor_type = self.tensor_type
        if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
            for key, value in list(output.items()):
                moved = value if key in self.skip else _move_value(value, caller, None, tensor_type)
                if moved is not value:
                    output[key] = moved  # ModelOutput.__setitem__ updates the attribute too
            return output
        # A tuple (return_dict=False) or a bare tensor: the same rule, one level deep.
        if type(output) is tuple:
            return tuple(_move_value(value, caller, None, tensor_type) for value in output)
        return _move_value(output, caller, None, tensor_type)

    def __repr__(self) -> str:
        return f"LeanRootHook(execution_device={self.execution_device})"

    # threading.local cannot be copied: copies of the model get a fresh one. torch's
    # RemovableHandle follows the copied hook dicts.
    def __getstate__(self) -> _RootState:
        return self.execution_device, self.memo, self.skip, self.restore

    def __setstate__(self, state: _RootState) -> None:
        _RootHook.__init__(self, *state[:3])
        self.restore = state[3]


def hooks_in_place(model: nn.Module) -> str:
    """Which hooks ``model`` has: ``"lean"`` (omnifix's), ``"accelerate"`` (other) or ``"none"``."""
    hooks = [hook for module in model.modules() for hook in iter_hooks(module)]
    if any(isinstance(hook, _EntryHook) for hook in hooks):
        return "lean"
    return "accelerate" if hooks else "none"


class LeanDispatch(Handle):
    """Handle returned by :func:`omnifix.lean_dispatch` (see :class:`omnifix.types.Handle`).

    ``remove()`` puts back exactly the accelerate hooks that were taken off; weights stay where
    they are. A later ``lean_dispatch`` of the same model removes this handle first.
    """

    __slots__ = ("_attached", "_devices", "_model", "_replaced")

    def __init__(
        self, model: nn.Module, attached: Hooked, replaced: Hooked, devices: tuple[str, ...]
    ) -> None:
        """The hooks attached and replaced on ``model``."""
        super().__init__()
        self._model = weakref.ref(model)
        self._attached = tuple((weakref.ref(module), hook) for module, hook in attached)
        self._replaced = tuple((weakref.ref(module), hook) for module, hook in replaced)
        self._devices = devices

    @property
    def hooks(self) -> int:
        """How many hooks omnifix attached (0 when the model is on one device)."""
        return len(self._attached)

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices the model computes on, accelerators by index first (``("cuda:0", ...)``)."""
        return self._devices

    @property
    def replaced(self) -> int:
        """How many accelerate hooks were taken off (and come back on :meth:`remove`)."""
        return len(self._replaced)

    def _undo(self) -> None:
        from accelerate.hooks import add_hook_to_module

        for ref, hook in self._attached:
            module = ref()
            if module is not None and getattr(module, "_hf_hook", None) is hook:
                _detach(module)
        for ref, hook in self._replaced:
            module = ref()
            if module is not None:
                add_hook_to_module(module, hook)
        model = self._model()
        if model is not None and _ACTIVE.get(model) is self:
            del _ACTIVE[model]

    def __repr__(self) -> str:
        """Hooks, devices, replaced accelerate hooks, and whether the dispatch is active."""
        return (
            f"LeanDispatch(hooks={self.hooks}, devices={self._devices!r}, "
            f"replaced={self.replaced}, active={self.active})"
        )


def _detach(module: nn.Module) -> None:
    """``remove_hook_from_module``, keeping dispatch_model's ``.to``/``.cuda`` guards on a root."""
    from accelerate.hooks import remove_hook_from_module

    kept = dict(module.__dict__)
    remove_hook_from_module(module)
    for key, value in kept.items():
        if key not in ("_hf_hook", "_old_forward", "forward"):
            module.__dict__.setdefault(key, value)


def _placements(
    model: nn.Module, device_map: Mapping[str, object] | None
) -> tuple[dict[str, str], bool]:
    """``{entry: "cuda:0" | "cpu" | "disk" | ...}`` and whether the caller gave the map."""
    if device_map is not None:
        if not isinstance(device_map, Mapping):
            raise InvalidArgumentError(
                f"lean_dispatch got device_map={device_map!r}; it needs an explicit "
                "{module_name: device} mapping. Pass one (e.g. {'model.layers.0': 0, ...}), or "
                "device_map=None to use model.hf_device_map."
            )
        return normalize_map(device_map), True  # checked like load_safely's maps
    recorded = getattr(model, "hf_device_map", None)
    if isinstance(recorded, Mapping) and recorded:
        return dict(Placement.of(recorded).entries), False
    return _inferred_map(model), False


def _tensors(module: nn.Module, *, recurse: bool = True) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=recurse)
    yield from module.buffers(recurse=recurse)


def _inferred_map(model: nn.Module) -> dict[str, str]:
    """A device_map read from where the tensors are: the largest modules on a single device."""
    found: dict[str, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        where = {spell(tensor.device) for tensor in _tensors(module)}
        if len(where) <= 1:
            if where:
                found[name] = next(iter(where))
            return
        own = {spell(tensor.device) for tensor in _tensors(module, recurse=False)}
        if len(own) > 1:
            raise InvalidArgumentError(
                f"{type(module).__name__} {name or '(the model)'} holds its own tensors on "
                f"{', '.join(sorted(own))}, so no device_map entry can describe it. Pass "
                "device_map= (lean_dispatch moves each entry's module to its device)."
            )
        if own:
            found[name] = next(iter(own))
        for child, submodule in module.named_children():
            visit(f"{name}.{child}" if name else child, submodule)

    visit("", model)
    if "meta" in found.values():
        missing = sorted(name for name, where in found.items() if where == "meta")
        raise InvalidArgumentError(
            f"{', '.join(repr(name or '(the model)') for name in missing[:3])} of "
            f"{type(model).__name__} have weights on 'meta' and the model has no hf_device_map "
            "saying where they run: offloaded behind other hooks, or never loaded. Fix: load the "
            "weights first (from_pretrained, or accelerate's load_checkpoint_and_dispatch); for "
            "an offloaded model, keep accelerate's hooks (do not call lean_dispatch on it)."
        )
    return found


def _refuse_offload(placements: Mapping[str, str]) -> None:
    placement = Placement.of(placements)
    if placement.offloads:
        offloaded = sorted(placement.offloaded)
        shown = ", ".join(f"{name or '(root)'}: {placements[name]}" for name in offloaded[:4])
        more = f" and {len(offloaded) - 4} more" if len(offloaded) > 4 else ""  # noqa: PLR2004
        computing = sorted(set(placements.values()) - set(OFFLOAD_TARGETS), key=place_order)
        raise InvalidArgumentError(
            f"The device_map offloads {shown}{more} next to entries on "
            f"{', '.join(computing) or 'no GPU'}: offloaded weights are streamed to the GPU by "
            f"accelerate's hooks on every forward, which lean hooks do not do. {_OFFLOAD_FIX}"
        )


def _resolve_entries(
    model: nn.Module, placements: Mapping[str, str]
) -> tuple[list[Entry], list[tuple[str, torch.device]]]:
    """Modules of the entries (and entries naming a single parameter or buffer), with devices."""
    import torch

    named = dict(model.named_modules(remove_duplicate=False))
    modules: list[Entry] = []
    tensors: list[tuple[str, torch.device]] = []
    for name, where in placements.items():
        device = torch.device(where)
        if str(device) == "cuda":  # a bare "cuda" in hf_device_map: the current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.type == "mps":  # spelled bare in maps; tensors there report mps:0
            device = torch.device("mps", 0)
        owner, _, attribute = name.rpartition(".")
        if name in named:
            modules.append((name, named[name], device))
        elif owner in named and any(
            registry.get(attribute) is not None
            for registry in (named[owner]._parameters, named[owner]._buffers)  # noqa: SLF001
        ):
            tensors.append((name, device))
        else:
            raise InvalidArgumentError(
                f"The device_map names {name!r}, which {type(model).__name__} has no "
                "module, parameter or buffer called. Fix: use names from "
                "model.named_modules() (e.g. 'model.layers.0'), as from_pretrained does."
            )
    return modules, tensors


def _accelerate_hooks(model: nn.Module) -> Hooked:
    """What lean hooks replace: accelerate's alignment hooks (others stay); refuses offloading."""
    from accelerate.hooks import AlignDevicesHook

    found: Hooked = []
    for name, module in model.named_modules():
        parts = list(iter_hooks(module))
        if any(getattr(part, "offload", False) for part in parts):
            raise InvalidArgumentError(
                f"{name or type(model).__name__} has an accelerate hook that offloads its "
                "weights (they live on the cpu or disk and are copied in for every forward), "
                f"which lean hooks do not do. {_OFFLOAD_FIX}"
            )
        if parts and all(isinstance(part, AlignDevicesHook) for part in parts):
            found.append((module, module.__dict__["_hf_hook"]))
    return found


def _check_placed(modules: Iterable[Entry]) -> None:
    """Every tensor is on the device of the entry that places it (maps read from the model).

    That entry is the longest prefix of the tensor's name (accelerate's rule): an entry's
    submodules that have entries of their own are checked against those.
    """
    entries = list(modules)
    where = {name: device for name, _, device in entries}
    for name, module, device in entries:
        for local, tensor in (*module.named_parameters(), *module.named_buffers()):
            full = f"{name}.{local}" if name else local
            if locate(where, full) == (name, device) and tensor.device != device:
                raise DeviceError(
                    f"model.hf_device_map puts {name or '(root)'} on {device}, but some of its "
                    f"tensors are on {tensor.device}. Fix: pass device_map= to lean_dispatch, "
                    "which moves each entry's module to its device."
                )


def _move(modules: Iterable[Entry]) -> None:
    """Move each entry's module to its device, outer entries first; skip what is already there."""
    outer_first = sorted(modules, key=lambda entry: entry[0].count(".") if entry[0] else -1)
    for _, module, device in outer_first:
        if any(tensor.device != device for tensor in _tensors(module)):
            # The class's .to, not the instance's: dispatch_model wraps model.to with a warning.
            type(module).to(module, device)


def lean_dispatch(
    model: nn.Module, *, device_map: Mapping[str, int | str | torch.device] | None = None
) -> LeanDispatch:
    """Run a model split over several GPUs with hooks only where tensors cross a device.

    Takes accelerate's hooks off the model (remembering each) and adds one light pre-forward hook
    per ``device_map`` entry and one on the model: inputs go to the input embedding's device,
    outputs come back to the caller's. A model on one device gets no hook at all.

    Args:
        model: A model on one or several devices, e.g. from ``from_pretrained(device_map=...)``.
        device_map: ``{module_name: device}`` (``0``, ``"cuda:1"``, ``"cpu"``, a
            :class:`torch.device`): each entry's module is moved to its device first (if not
            there) and the map stored as ``model.hf_device_map``. ``None`` (default):
            ``model.hf_device_map``, else where the weights are.

    Returns:
        The :class:`omnifix.types.LeanDispatch` handle, with ``.hooks`` (how many were attached)
        and ``.devices``; ``.remove()`` it (or leave ``with``) to put accelerate's hooks back.

    Raises:
        InvalidArgumentError: The map offloads weights (``"cpu"`` or ``"disk"`` entries next to
            GPU ones, or ``"disk"`` at all) or the model has accelerate hooks that offload (both
            need accelerate's weight streaming), or the map names what the model lacks.
        DeviceError: A device in the map is malformed or missing, tied weights are mapped to
            two devices, or ``hf_device_map`` disagrees with where the weights are.
        DeviceCopyError: Copies between two of the GPUs arrive changed (checked once per pair
            and process, before anything changes).
        UnsupportedModelError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch, omnifix
        >>> from accelerate import dispatch_model
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> model = Qwen2ForCausalLM(config).eval()
        >>> cpu_map = {"model": "cpu", "lm_head": "cpu"}
        >>> model = dispatch_model(model, device_map=cpu_map, force_hooks=True)
        >>> with omnifix.lean_dispatch(model) as lean:  # one device: accelerate's hooks go
        ...     lean
        ...     model(torch.tensor([[1, 2, 3]])).logits.shape
        LeanDispatch(hooks=0, devices=('cpu',), replaced=..., active=True)
        torch.Size([1, 3, 64])
        >>> hasattr(model.lm_head, "_hf_hook")  # put back by remove()
        True
    """
    require_module(model, "lean_dispatch")
    # Everything is checked before anything changes: a refused call leaves the model as it was.
    placements, given = _placements(model, device_map)
    _refuse_offload(placements)
    if given:
        check_map(model, placements)
    modules, tensor_entries = _resolve_entries(model, placements)
    if not given:
        _check_placed(modules)
    placed = {str(entry[-1]) for entry in (*modules, *tensor_entries)}
    check_copies(placed)  # DeviceCopyError: the hooks would hand over corrupted tensors
    previous = _ACTIVE.get(model)
    if previous is not None:  # dispatched again: the earlier handle's hooks go first
        previous.remove()
    for module in model.modules():  # lean hooks no handle owns (a copy of a dispatched model)
        if isinstance(getattr(module, "_hf_hook", None), _EntryHook):
            _detach(module)
    replaced = _accelerate_hooks(model)
    devices = tuple(sorted(placed, key=place_order))
    for module, _ in replaced:
        _detach(module)
    if given:
        _move(modules)
        for name, device in tensor_entries:
            _move_tensor(model, name, device)
        # Where from_pretrained and dispatch_model record it (a plain attribute of the model).
        vars(model)["hf_device_map"] = dict(device_map or {})
    attached = _attach(model, modules) if len(devices) > 1 else []
    handle = LeanDispatch(model, attached, replaced, devices)
    _ACTIVE[model] = handle
    return handle


def _attach(model: nn.Module, modules: list[Entry]) -> Hooked:
    """A lean hook on every entry and a root hook; modules with other hooks keep theirs."""
    from accelerate.hooks import add_hook_to_module

    memo = _Memo()
    skip = _SKIP_KEYS | frozenset(getattr(model, "_skip_keys_device_placement", None) or ())
    top, root_device = _root(model, modules)
    attached: Hooked = []
    for name, module, device in modules:
        if name and module is not top and getattr(module, "_hf_hook", None) is None:
            hook = _EntryHook(device, memo, skip)
            add_hook_to_module(module, hook)
            attached.append((module, hook))
    if getattr(top, "_hf_hook", None) is None:
        root = _RootHook(root_device, memo, skip)
        add_hook_to_module(top, root)
        attached.append((top, root))
    return attached


def _root(model: nn.Module, modules: list[Entry]) -> tuple[nn.Module, torch.device]:
    """The module callers run, which gets the root hook, and where its inputs go.

    The model, or if it has no ``forward`` (Qwen2.5-Omni), the child with the primary input
    embedding; the device of that embedding's entry, else of the first entry.
    """
    from torch import nn

    embeddings = find_input_embeddings(model)
    name = embeddings[0][0] if embeddings else ""
    found = locate({entry: device for entry, _, device in modules}, name) if embeddings else None
    device = modules[0][2] if found is None else found[1]
    if type(model).forward is not nn.Module.forward or not name:
        return model, device
    return model.get_submodule(name.split(".", 1)[0]), device


def _move_tensor(model: nn.Module, name: str, device: torch.device) -> None:
    """Move the parameter or buffer ``name`` (an entry that names a tensor) to ``device``."""
    from torch import nn

    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    tensor = getattr(owner, attribute)
    if tensor.device == device:
        return
    if isinstance(tensor, nn.Parameter):
        owner._parameters[attribute] = nn.Parameter(  # noqa: SLF001 - as nn.Module._apply does
            tensor.data.to(device), requires_grad=tensor.requires_grad
        )
    else:
        owner._buffers[attribute] = tensor.to(device)  # noqa: SLF001
