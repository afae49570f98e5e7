"""A device_map that splits every language model of a model layer by layer, for placement tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from torch import nn

# Modules kept whole, on the first device: towers, the projector, Omni's vocoder.
_TOWERS: Final = frozenset({"visual", "audio_tower", "multi_modal_projector", "token2wav"})
# Modules that go to the second device, with the second half of the layers.
_LATE: Final = frozenset({"norm", "lm_head", "rotary_emb"})

_D = TypeVar("_D")


def layer_split_map(model: nn.Module, first: _D, second: _D) -> dict[str, _D]:
    """A per-layer ``device_map``: the first half of the layers on ``first``, the rest after.

    The final norm, rotary embedding and ``lm_head`` go with the second half, to ``second``;
    towers, projector and embeddings stay whole on ``first``. Every language model is split
    (Qwen2.5-Omni: thinker and talker). Module names are read from the model, since they differ
    between transformers versions; any device values work (ints, ``"cpu"``, ``"disk"``), so the
    same map serves CPU tests and two-GPU ones.

    Example:
        >>> import omnifix.testing as ot
        >>> device_map = ot.layer_split_map(ot.tiny_model("qwen2"), 0, 1)
        >>> [device_map[f"model.layers.{i}"] for i in range(4)], device_map["lm_head"]
        ([0, 0, 1, 1], 1)
    """
    from torch import nn

    layers = {
        name: len(module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.endswith("layers")
        and not _TOWERS & set(name.split("."))
    }
    device_map: dict[str, _D] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for child, submodule in module.named_children():
            name = f"{prefix}.{child}" if prefix else child
            if name in layers:
                count = layers[name]
                for index in range(count):
                    device_map[f"{name}.{index}"] = first if index < count // 2 else second
            elif any(layer.startswith(name + ".") for layer in layers):
                visit(name, submodule)
            else:
                device_map[name] = second if child in _LATE else first

    visit("", model)
    return device_map
