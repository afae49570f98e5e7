"""omnifix.lean_dispatch on real tiny models, real accelerate hooks, and faked GPUs."""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifix
import omnifix.testing as ot
from omnifix import _dispatch

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from types import ModuleType

    import torch
    from torch import nn

    from omnifix.testing import Family

    #: ``layer_split_map(model, first, second)`` of ``benchmarks/_models.py``.
    SplitMap = Callable[..., dict[str, Any]]

# transformers models are untyped at the seams we touch; tests hold them as ``Any``.
Model = Any

OFFLOAD_FIX = (
    'Fix: keep accelerate\'s hooks for offloaded models (load_safely(..., hooks="accelerate"), '
    "or do not call lean_dispatch on them), or give a device_map without 'cpu'/'disk' entries."
)


def accelerate_hooks(model: Model) -> dict[str, object]:
    return {
        name: module._hf_hook
        for name, module in model.named_modules()
        if hasattr(module, "_hf_hook")
    }


def runner(model: Model, family: Family) -> Model:
    # The full Omni class has no forward of its own: its thinker computes the logits.
    return model.thinker if family == "qwen2.5-omni" else model


def inputs_for(model: Model, family: Family) -> dict[str, torch.Tensor]:
    config = model.config.thinker_config if family == "qwen2.5-omni" else model.config
    return ot.tiny_inputs(family, config)


def families() -> tuple[Family, ...]:
    return ot.available_families()


@pytest.fixture(scope="module")
def layer_split_map(bench_models: ModuleType) -> SplitMap:
    """A per-layer map: half of every language model's layers on ``first``, half on ``second``."""
    split: SplitMap = bench_models.layer_split_map
    return split


# --- accelerate's hooks out, and back -------------------------------------------------------


@pytest.mark.parametrize("family", families())
def test_replaces_accelerate_hooks_and_remove_restores_them(
    family: Family, layer_split_map: SplitMap
) -> None:
    import torch
    from accelerate import dispatch_model

    model = ot.tiny_model(family)
    inputs = inputs_for(model, family)
    with torch.no_grad():
        reference = runner(model, family)(**inputs).logits
        device_map = layer_split_map(model, "cpu", "cpu")
        dispatch_model(model, device_map=device_map, force_hooks=True)
        before = accelerate_hooks(model)
        assert len(before) > len(device_map)  # one per module with weights, not per entry
        tensors = {name: id(tensor) for name, tensor in model.state_dict(keep_vars=True).items()}
        lean = omnifix.lean_dispatch(model)
        assert lean.hooks == 0  # one device: nothing has to move
        assert lean.devices == ("cpu",)
        assert lean.replaced == len(before)
        assert accelerate_hooks(model) == {}
        assert omnifix.placement_report(model).hooks == "none"
        assert torch.equal(runner(model, family)(**inputs).logits, reference)
        lean.remove()
        after = accelerate_hooks(model)
        assert after.keys() == before.keys()
        assert all(after[name] is hook for name, hook in before.items())  # the same objects
        assert omnifix.placement_report(model).hooks == "accelerate"
        # Re-adding the hooks re-placed no tensor: parameters and buffers are the same objects.
        assert {n: id(t) for n, t in model.state_dict(keep_vars=True).items()} == tensors
        assert torch.equal(runner(model, family)(**inputs).logits, reference)
    assert not lean.active
    lean.remove()  # a second remove does nothing
    assert accelerate_hooks(model).keys() == before.keys()


def test_keeps_dispatch_models_move_warning_and_tied_weights(
    tied_lm_dir: Path, layer_split_map: SplitMap
) -> None:
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    model: Model = AutoModelForCausalLM.from_pretrained(tied_lm_dir).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dispatch_model(model, device_map=layer_split_map(model, "cpu", "cpu"), force_hooks=True)
    wrapped_to = vars(model)["to"]  # dispatch_model's "You shouldn't move a dispatched model"
    with omnifix.lean_dispatch(model):
        assert vars(model)["to"] is wrapped_to
    assert vars(model)["to"] is wrapped_to
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_other_hooks_are_left_in_place(layer_split_map: SplitMap) -> None:
    from accelerate import dispatch_model
    from accelerate.hooks import ModelHook, add_hook_to_module

    model: Model = ot.tiny_model("qwen2")
    dispatch_model(model, device_map=layer_split_map(model, "cpu", "cpu"), force_hooks=True)
    mine = ModelHook()
    add_hook_to_module(model.lm_head, mine)  # replaces accelerate's hook there
    others = len(accelerate_hooks(model)) - 1
    with omnifix.lean_dispatch(model) as lean:
        assert model.lm_head._hf_hook is mine
        assert lean.replaced == others
        assert set(accelerate_hooks(model)) == {"lm_head"}
    assert model.lm_head._hf_hook is mine


def test_plain_model_on_one_device_gets_no_hook() -> None:
    model: Model = ot.tiny_model("qwen2-vl")
    lean = omnifix.lean_dispatch(model)
    assert (lean.hooks, lean.replaced, lean.devices) == (0, 0, ("cpu",))
    assert accelerate_hooks(model) == {}
    assert "hooks=0" in repr(lean)
    assert "active=True" in repr(lean)


def test_a_given_map_is_recorded_as_hf_device_map(layer_split_map: SplitMap) -> None:
    import torch

    model: Model = ot.tiny_model("qwen2")
    device_map = layer_split_map(model, "cpu", torch.device("cpu"))
    with omnifix.lean_dispatch(model, device_map=device_map) as lean:
        assert lean.hooks == 0
        assert model.hf_device_map == device_map


def test_dispatching_again_replaces_the_earlier_handle(layer_split_map: SplitMap) -> None:
    from accelerate import dispatch_model

    model: Model = ot.tiny_model("qwen2")
    dispatch_model(model, device_map=layer_split_map(model, "cpu", "cpu"), force_hooks=True)
    before = accelerate_hooks(model)
    first = omnifix.lean_dispatch(model)
    second = omnifix.lean_dispatch(model)
    assert not first.active
    assert second.active
    assert second.replaced == len(before)
    second.remove()
    assert accelerate_hooks(model) == before


# --- refusals ---------------------------------------------------------------------------------


def test_a_map_with_cpu_and_disk_is_refused_with_the_fix(layer_split_map: SplitMap) -> None:
    model: Model = ot.tiny_model("qwen2")
    device_map: dict[str, str | int] = {
        **layer_split_map(model, "cpu", "cpu"),
        "lm_head": "disk",
    }
    with pytest.raises(omnifix.InvalidArgumentError) as raised:
        omnifix.lean_dispatch(model, device_map=device_map)
    message = str(raised.value)
    assert "lm_head: disk" in message
    assert message.endswith(OFFLOAD_FIX)
    assert not hasattr(model, "hf_device_map")  # refused before anything changed


def test_an_offloaded_dispatch_is_refused_and_keeps_accelerates_hooks(
    tmp_path: Path, layer_split_map: SplitMap
) -> None:
    import torch
    from accelerate import dispatch_model

    model: Model = ot.tiny_model("qwen2")
    inputs = inputs_for(model, "qwen2")
    with torch.no_grad():
        reference = model(**inputs).logits
    device_map = {**layer_split_map(model, "cpu", "cpu"), "model.layers.1": "disk"}
    dispatch_model(model, device_map=device_map, offload_dir=tmp_path)
    before = accelerate_hooks(model)
    with pytest.raises(omnifix.InvalidArgumentError, match="offloads") as raised:
        omnifix.lean_dispatch(model)  # the map from model.hf_device_map
    assert str(raised.value).endswith(OFFLOAD_FIX)
    assert accelerate_hooks(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_cpu_next_to_a_gpu_is_offload() -> None:
    model: Model = ot.tiny_model("qwen2")
    # What from_pretrained records for weights streamed from the cpu to GPU 0 (not loaded here).
    model.hf_device_map = {"model": 0, "lm_head": "cpu"}
    with pytest.raises(
        omnifix.InvalidArgumentError, match=r"lm_head: cpu next to entries on cuda:0"
    ):
        omnifix.lean_dispatch(model)


def test_a_map_naming_what_the_model_lacks_is_refused() -> None:
    model: Model = ot.tiny_model("qwen2")
    with pytest.raises(omnifix.InvalidArgumentError, match=r"'model\.decoder'"):
        omnifix.lean_dispatch(model, device_map={"model.decoder": "cpu", "lm_head": "cpu"})


def test_hf_device_map_that_disagrees_with_the_weights_is_refused() -> None:
    model: Model = ot.tiny_model("qwen2")
    model.hf_device_map = {"model": 0, "lm_head": 1}  # the weights are on the cpu
    with pytest.raises(omnifix.DeviceError, match="model on cuda:0"):
        omnifix.lean_dispatch(model)


def test_not_a_module_is_refused() -> None:
    with pytest.raises(omnifix.UnsupportedModelError):
        omnifix.lean_dispatch("Qwen/Qwen2-VL-2B-Instruct")  # type: ignore[arg-type]


# --- load_safely and the report ---------------------------------------------------------------


def test_load_safely_on_the_cpu_reports_no_hooks(tiny_lm_dir: Path) -> None:
    model = omnifix.load_safely(tiny_lm_dir, device="cpu")
    report = omnifix.placement_report(model)
    assert report.hooks == "none"
    assert "hooks:" not in str(report)


def test_load_safely_takes_hooks_accelerate_and_refuses_other_values(tiny_lm_dir: Path) -> None:
    model = omnifix.load_safely(tiny_lm_dir, device="cpu", hooks="accelerate")
    assert omnifix.placement_report(model).hooks == "none"  # one device: no hooks either way
    with pytest.raises(omnifix.InvalidArgumentError, match=r"hooks='fast'.*hooks=\"lean\""):
        omnifix.load_safely(tiny_lm_dir, device="cpu", hooks="fast")  # type: ignore[arg-type]


def test_offloaded_load_keeps_accelerates_hooks_and_says_so(
    tiny_lm_dir: Path, tmp_path: Path, layer_split_map: SplitMap
) -> None:
    from transformers import AutoModelForCausalLM

    skeleton: Model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    device_map = {**layer_split_map(skeleton, "cpu", "cpu"), "model.layers.2": "disk"}
    model = omnifix.load_safely(
        tiny_lm_dir, device_map=device_map, allow_offload=True, offload_folder=str(tmp_path)
    )
    report = omnifix.placement_report(model)
    assert report.hooks == "accelerate"
    assert "hooks: accelerate (offloaded weights are streamed by them)" in str(report)


# --- the hooks on every family, forced on one device ------------------------------------------
# Lean hooks only go on a model that spans several devices, and this machine has one. Attaching
# them (the private step lean_dispatch ends with) to an all-cpu per-layer map runs every family's
# real forward and generate through them: they must change nothing.


@pytest.mark.parametrize("family", families())
def test_lean_hooks_change_no_logits_and_no_token(
    family: Family, layer_split_map: SplitMap
) -> None:
    import torch

    model = ot.tiny_model(family)
    inputs = inputs_for(model, family)
    generate_kwargs = ot.text_generation_kwargs(family, max_new_tokens=3)
    with torch.no_grad():
        reference = runner(model, family)(**inputs).logits
        tokens = model.generate(**inputs, **generate_kwargs, do_sample=False)
        entries = [
            (name, model.get_submodule(name), torch.device("cpu"))
            for name in layer_split_map(model, "cpu", "cpu")
        ]
        attached = _dispatch._attach(model, entries)
        assert len(attached) <= len(entries) + 1
        assert omnifix.placement_report(model).hooks == "lean"
        assert omnifix.input_device(model) == torch.device("cpu")
        assert torch.equal(runner(model, family)(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, **generate_kwargs, do_sample=False), tokens)
        copied = copy.deepcopy(model)  # hooks with a thread-local and a memo copy cleanly
        assert torch.equal(runner(copied, family)(**inputs).logits, reference)
        # A copy's hooks belong to no handle; dispatching the copy takes them off.
        assert omnifix.placement_report(copied).hooks == "lean"
        assert omnifix.lean_dispatch(copied).hooks == 0
        assert omnifix.placement_report(copied).hooks == "none"


# --- crossing devices, on faked GPUs ------------------------------------------------------------
# torch's FakeTensorMode lets tensors claim cuda:0 and cuda:1 on this CPU-only machine, with the
# real device checks of every op ("Expected all tensors to be on the same device"). A small model
# shaped like a decoder (the parent computes position embeddings once, on the rotary module's
# device, and hands them and the caller's mask to every layer) runs through the real hooks.


def rotary_embedding() -> nn.Module:
    import torch
    from torch import nn

    class RotaryEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("inv_freq", torch.ones(4), persistent=False)

        def forward(self, _x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            freqs = ids.unsqueeze(-1).float() * self.inv_freq
            return freqs.cos(), freqs.sin()

    return RotaryEmbedding()


def block() -> nn.Module:
    """A layer that records the shared tensors it receives."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.cache: object = None
            self.extra: object = None
            self.touch_cos = False

        def forward(
            self,
            hidden: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor],
            mask: torch.Tensor,
            past_key_values: object = None,
            extra: object = None,
        ) -> torch.Tensor:
            cos, sin = position_embeddings
            self.seen.append((cos, mask))
            self.cache = past_key_values
            self.extra = extra
            if self.touch_cos:
                cos.mul_(1)  # a layer that changes its input in place
            return self.linear(hidden) * cos + sin + mask.unsqueeze(-1)

    return Block()


def build_toy(layers: int) -> nn.Module:
    """A decoder in small: embeddings, position embeddings made once, layers, norm, head."""
    from torch import nn

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(16, 4)
            self.rotary_emb = rotary_embedding()
            self.layers = nn.ModuleList(block() for _ in range(layers))
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 16)
            self.touch_after: int | None = None
            self.output = "dict"

        def get_input_embeddings(self) -> nn.Module:
            return self.embed_tokens

        def forward(
            self,
            input_ids: torch.Tensor,
            mask: torch.Tensor,
            past_key_values: object = None,
            extra: object = None,
        ) -> Any:
            hidden = self.embed_tokens(input_ids)
            position_embeddings = self.rotary_emb(hidden, input_ids)
            for index, layer in enumerate(self.layers):
                hidden = layer(
                    hidden,
                    position_embeddings,
                    mask=mask,
                    past_key_values=past_key_values,
                    extra=extra,
                )
                if index == self.touch_after:
                    position_embeddings[0].mul_(1)  # the parent changes a shared tensor in place
            logits = self.head(self.norm(hidden))
            if self.output == "tuple":  # return_dict=False
                return logits, (hidden, hidden), past_key_values
            if self.output == "tensor":
                return logits
            return {
                "logits": logits,
                "hidden_states": (hidden, hidden),
                "past_key_values": past_key_values,
            }

    return Toy()


def place(module: nn.Module, device: str) -> None:
    """Move a module's fake tensors (``.to`` cannot swap fake parameters in place)."""
    from torch import nn

    for submodule in module.modules():
        for key, value in list(submodule._parameters.items()):
            if value is not None:
                submodule._parameters[key] = nn.Parameter(value.to(device), requires_grad=False)
        for key, value in list(submodule._buffers.items()):
            if value is not None:
                submodule._buffers[key] = value.to(device)


def toy_on(placement: dict[str, str]) -> Model:
    """The toy with each entry placed, ``hf_device_map`` set as from_pretrained would."""
    toy: Model = build_toy(sum(1 for name in placement if name.startswith("layers.")))
    for name, device in placement.items():
        place(toy.get_submodule(name), device)
    toy.hf_device_map = dict(placement)
    return toy


def split_placement(layer_devices: list[str], **others: str) -> dict[str, str]:
    """Embeddings on cuda:0, the rotary embedding, norm and head on cuda:1, layers as given."""
    placement = {"embed_tokens": "cuda:0", "rotary_emb": "cuda:1"}
    placement.update({f"layers.{index}": device for index, device in enumerate(layer_devices)})
    placement.update({"norm": "cuda:1", "head": "cuda:1"})
    placement.update(others)
    return placement


@pytest.fixture
def fake_gpus() -> Iterator[None]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.no_grad():
        yield


def toy_inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return (
        torch.zeros(1, 3, dtype=torch.long, device=device),
        torch.zeros(1, 3, device=device),
    )


def test_split_toy_fails_without_hooks_and_runs_with_them(fake_gpus: None) -> None:
    import torch

    toy = toy_on(split_placement(["cuda:0", "cuda:0", "cuda:1", "cuda:1"]))
    ids, mask = toy_inputs("cpu")
    with pytest.raises(RuntimeError, match="same device"):
        toy(ids, mask)
    with omnifix.lean_dispatch(toy) as lean:
        assert lean.hooks == len(toy.hf_device_map) + 1
        assert lean.devices == ("cuda:0", "cuda:1")
        assert omnifix.input_device(toy) == torch.device("cuda:0")
        out = toy(ids, mask)
        assert out["logits"].device == torch.device("cpu")  # back on the caller's device
        assert {tensor.device for tensor in out["hidden_states"]} == {torch.device("cpu")}
    with pytest.raises(RuntimeError, match="same device"):
        toy(ids, mask)  # removed: as before


def test_shared_tensors_cross_once_per_forward(fake_gpus: None) -> None:
    import torch

    toy = toy_on(split_placement(["cuda:0", "cuda:0", "cuda:1", "cuda:1"]))
    ids, mask = toy_inputs("cpu")
    omnifix.lean_dispatch(toy)
    toy(ids, mask)
    (cos_0, mask_0), (cos_1, mask_1), (cos_2, mask_2), (cos_3, mask_3) = (
        layer.seen[-1] for layer in toy.layers
    )
    # cos is made on cuda:1 (rotary_emb): one copy for both layers on cuda:0, the original after.
    assert cos_0 is cos_1
    assert cos_0.device == torch.device("cuda:0")
    assert cos_2 is cos_3
    assert cos_2.device == torch.device("cuda:1")
    # The caller's mask: moved to the embedding's GPU by the root hook, then once to cuda:1.
    assert mask_0 is mask_1
    assert mask_0.device == torch.device("cuda:0")
    assert mask_2 is mask_3
    assert mask_2.device == torch.device("cuda:1")
    # The next forward gets new copies: the root hook clears the memo (the copies above are
    # still referenced, so a new tensor cannot reuse their ids).
    toy(ids, mask)
    assert toy.layers[0].seen[-1][1] is not mask_0
    assert toy.layers[2].seen[-1][1] is not mask_2


def test_a_tensor_changed_in_place_is_copied_again(fake_gpus: None) -> None:
    toy = toy_on(split_placement(["cuda:0", "cuda:0", "cuda:0"]))
    ids, mask = toy_inputs("cuda:0")
    omnifix.lean_dispatch(toy)
    toy.touch_after = 0  # the parent changes cos (on cuda:1) after layer 0
    toy(ids, mask)
    assert toy.layers[0].seen[-1][0] is not toy.layers[1].seen[-1][0]
    assert toy.layers[1].seen[-1][0] is toy.layers[2].seen[-1][0]
    toy.touch_after = None
    toy.layers[0].touch_cos = True  # layer 0 changes the copy it was given
    toy(ids, mask)
    assert toy.layers[0].seen[-1][0] is not toy.layers[1].seen[-1][0]
    assert toy.layers[1].seen[-1][0] is toy.layers[2].seen[-1][0]


def test_nothing_is_copied_where_nothing_must_move(fake_gpus: None) -> None:
    toy = toy_on(split_placement(["cuda:1", "cuda:1"], embed_tokens="cuda:1", head="cuda:0"))
    ids, mask = toy_inputs("cuda:1")
    omnifix.lean_dispatch(toy)
    toy(ids, mask)
    for layer in toy.layers:
        assert layer.seen[-1][1] is mask  # already where every layer runs: the same tensor


def test_the_cache_is_never_moved(fake_gpus: None) -> None:
    import torch

    toy = toy_on(split_placement(["cuda:0", "cuda:1"]))
    ids, mask = toy_inputs("cpu")
    cache = torch.zeros(2, device="cuda:1")  # a cache tensor stays where its layer wrote it
    omnifix.lean_dispatch(toy)
    out = toy(ids, mask, past_key_values=cache)
    assert out["past_key_values"] is cache
    assert all(layer.cache is cache for layer in toy.layers)


@settings(max_examples=30, deadline=None)
@given(
    layer_devices=st.lists(st.sampled_from(["cuda:0", "cuda:1"]), min_size=1, max_size=5),
    embed=st.sampled_from(["cuda:0", "cuda:1"]),
    rotary=st.sampled_from(["cuda:0", "cuda:1"]),
    head=st.sampled_from(["cuda:0", "cuda:1"]),
    caller=st.sampled_from(["cpu", "cuda:0", "cuda:1"]),
    inference=st.booleans(),
)
def test_any_split_runs_and_copies_each_shared_tensor_once_per_device(
    *, layer_devices: list[str], embed: str, rotary: str, head: str, caller: str, inference: bool
) -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    placement = split_placement(layer_devices, embed_tokens=embed, rotary_emb=rotary, head=head)
    split = len(set(placement.values())) > 1
    if not split:  # one device: no hook, so inputs must be there (as without any dispatch)
        caller = embed
    grad_mode = torch.inference_mode() if inference else torch.no_grad()
    with FakeTensorMode(), grad_mode:
        toy = toy_on(placement)
        ids, mask = toy_inputs(caller)
        lean = omnifix.lean_dispatch(toy)
        assert lean.hooks == (len(placement) + 1 if split else 0)
        out = toy(ids, mask)
        assert out["logits"].device == torch.device(caller)
        for layer, device in zip(toy.layers, layer_devices, strict=True):
            cos, seen_mask = layer.seen[-1]
            assert cos.device == seen_mask.device == torch.device(device)
        for device in set(layer_devices):
            on_device = [
                layer.seen[-1]
                for layer, where in zip(toy.layers, layer_devices, strict=True)
                if where == device
            ]
            assert len({id(cos) for cos, _ in on_device}) == 1
            assert len({id(seen) for _, seen in on_device}) == 1
        lean.remove()


# --- maps read from the weights, maps given, and what the root hook hands back -------------------


def hooked(model: nn.Module) -> dict[str, str]:
    """Where each lean hook of ``model`` runs its module, by module name."""
    return {
        name: str(module._hf_hook.execution_device)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "_hf_hook", None), _dispatch._EntryHook)
    }


def test_without_a_recorded_map_the_map_is_read_from_the_weights(fake_gpus: None) -> None:
    import torch

    placement = split_placement(["cuda:0", "cuda:1", "cuda:1"])
    toy = toy_on(placement)
    del toy.hf_device_map
    toy.register_buffer("step", torch.zeros(1, device="cuda:0"))  # the model's own tensor
    ids, mask = toy_inputs("cpu")
    with omnifix.lean_dispatch(toy) as lean:
        assert lean.devices == ("cuda:0", "cuda:1")
        # The largest modules on one device each: the layers one by one, since they differ.
        assert hooked(toy) == {"": "cuda:0", **placement}
        assert toy(ids, mask)["logits"].device == torch.device("cpu")
    # All layers on one GPU: the ModuleList is one entry.
    toy = toy_on(split_placement(["cuda:1", "cuda:1"]))
    del toy.hf_device_map
    with omnifix.lean_dispatch(toy):
        assert "layers" in hooked(toy)
        assert "layers.0" not in hooked(toy)


def test_a_module_whose_own_tensors_are_on_two_devices_has_no_entry(fake_gpus: None) -> None:
    import torch

    toy = toy_on(split_placement(["cuda:0", "cuda:1"]))
    del toy.hf_device_map
    toy.layers[0].register_buffer("scale", torch.ones(1, device="cuda:1"))
    toy.layers[0].register_buffer("shift", torch.ones(1, device="cuda:0"))
    with pytest.raises(omnifix.InvalidArgumentError) as caught:
        omnifix.lean_dispatch(toy)
    assert str(caught.value).startswith(
        "Block layers.0 holds its own tensors on cuda:0, cuda:1, so no device_map entry"
    )


def test_weights_on_meta_without_a_recorded_map_are_named() -> None:
    toy = build_toy(3)
    for index in (2, 0):
        toy.layers[index].to("meta")
    with pytest.raises(omnifix.InvalidArgumentError) as caught:
        omnifix.lean_dispatch(toy)
    assert str(caught.value).startswith("'layers.0', 'layers.2' of Toy have weights on 'meta'")


@pytest.mark.parametrize("output", ["tuple", "tensor"])
def test_tuples_and_bare_tensors_come_back_to_the_callers_device(
    fake_gpus: None, output: str
) -> None:
    import torch

    toy = toy_on(split_placement(["cuda:0", "cuda:1"]))
    toy.output = output
    ids, mask = toy_inputs("cpu")
    cache = torch.zeros(1, device="cuda:1")
    omnifix.lean_dispatch(toy)
    out = toy(input_ids=ids, mask=mask, past_key_values=cache)  # the caller's device: keywords
    if output == "tensor":
        assert out.device == torch.device("cpu")
        return
    logits, hidden_states, _ = out
    assert type(out) is tuple
    assert logits.device == torch.device("cpu")
    assert {tensor.device for tensor in hidden_states} == {torch.device("cpu")}


def test_keys_the_model_keeps_in_place_are_not_moved(fake_gpus: None) -> None:
    import torch

    toy = toy_on(split_placement(["cuda:0", "cuda:1"]))
    ids, mask = toy_inputs("cuda:0")
    extra = torch.zeros(1, device="cuda:1")
    omnifix.lean_dispatch(toy)
    toy(ids, mask, extra=extra)
    assert toy.layers[0].extra.device == torch.device("cuda:0")  # moved to the layer's GPU
    toy = toy_on(split_placement(["cuda:0", "cuda:1"]))
    toy._skip_keys_device_placement = ["extra"]
    omnifix.lean_dispatch(toy)
    toy(ids, mask, extra=extra)
    assert toy.layers[0].extra is extra


def test_the_root_hook_sends_inputs_to_the_embedding_wherever_its_entry_is(
    fake_gpus: None,
) -> None:
    import torch

    # The embedding's entry is not the map's first, and names its parent.
    toy = build_toy(2)
    toy.stem = torch.nn.Module()
    toy.stem.embed_tokens = toy.embed_tokens
    placement = {"rotary_emb": "cuda:1", "stem": "cuda:0", "embed_tokens": "cuda:0"}
    placement.update(
        {"layers.0": "cuda:1", "layers.1": "cuda:1", "norm": "cuda:1", "head": "cuda:1"}
    )
    for name, device in placement.items():
        place(toy.get_submodule(name), device)
    toy.hf_device_map = placement
    ids, mask = toy_inputs("cpu")
    with omnifix.lean_dispatch(toy):
        assert toy._hf_hook.execution_device == torch.device("cuda:0")
        assert toy(ids, mask)["logits"].device == torch.device("cpu")


def test_a_model_without_forward_gets_its_root_hook_on_the_child_with_the_embedding(
    fake_gpus: None,
) -> None:
    import torch
    from torch import nn

    class Composite(nn.Module):  # like Qwen2.5-Omni: the thinker computes, the model has no forward
        def __init__(self) -> None:
            super().__init__()
            self.thinker = build_toy(2)

        def get_input_embeddings(self) -> nn.Module:
            return self.thinker.embed_tokens

    model = Composite()
    placement = {
        f"thinker.{name}": device for name, device in split_placement(["cuda:0"] * 2).items()
    }
    for name, device in placement.items():
        place(model.get_submodule(name), device)
    model.hf_device_map = placement
    ids, mask = toy_inputs("cpu")
    with omnifix.lean_dispatch(model) as lean:
        assert lean.hooks == len(placement) + 1
        assert isinstance(model.thinker._hf_hook, _dispatch._RootHook)
        assert model.thinker._hf_hook.execution_device == torch.device("cuda:0")
        assert not hasattr(model, "_hf_hook")
        assert model.thinker(ids, mask)["logits"].device == torch.device("cpu")


def test_modules_with_other_hooks_keep_them_and_get_no_lean_hook(fake_gpus: None) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module

    toy = toy_on(split_placement(["cuda:0", "cuda:1"]))
    head, root = ModelHook(), ModelHook()
    add_hook_to_module(toy.head, head)
    add_hook_to_module(toy, root)
    ids, mask = toy_inputs("cuda:0")
    with omnifix.lean_dispatch(toy) as lean:
        assert toy.head._hf_hook is head
        assert toy._hf_hook is root
        assert lean.hooks == len(toy.hf_device_map) - 1  # no lean hook on head, none on the root
        assert "head" not in hooked(toy)
        toy(ids, mask)
    assert toy.head._hf_hook is head


def test_removing_leaves_hooks_others_put_on_since(fake_gpus: None) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    toy = toy_on(split_placement(["cuda:0", "cuda:1"]))
    lean = omnifix.lean_dispatch(toy)
    mine = ModelHook()
    add_hook_to_module(toy.norm, mine)  # replaces the lean hook there
    remove_hook_from_module(toy.head)  # and this one is simply gone
    lean.remove()
    assert toy.norm._hf_hook is mine
    assert not hasattr(toy.head, "_hf_hook")
    assert hooked(toy) == {}


@contextlib.contextmanager
def cuda_runtime(count: int = 0) -> Iterator[list[int]]:
    """torch's CUDA probes and current device as on a machine with GPUs (``count`` of them).

    Yields the indices made current, in order (``torch.cuda.set_device``). With a ``count``,
    the copies between its GPUs are not checked: fake GPUs hold no data to compare.
    """
    import torch

    current = [0]
    calls: list[int] = []

    def set_device(index: int) -> None:
        calls.append(index)
        current[0] = index

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "is_available", return_value=True))
        stack.enter_context(
            mock.patch.object(torch.cuda, "current_device", side_effect=lambda: current[0])
        )
        stack.enter_context(mock.patch.object(torch.cuda, "set_device", set_device))
        if count:
            stack.enter_context(mock.patch.object(torch.cuda, "device_count", return_value=count))
            stack.enter_context(mock.patch.object(_dispatch, "check_copies", return_value=0))
        yield calls


def test_a_given_map_moves_only_what_is_elsewhere_and_lists_gpus_by_index(
    fake_gpus: None,
) -> None:
    import torch

    # Already where the map says: nothing is moved (fake tensors could not be moved in place).
    device_map = split_placement(["cuda:2", "cuda:10"], embed_tokens="cuda:10", head="cuda:2")
    toy = toy_on(device_map)
    del toy.hf_device_map
    ids, mask = toy_inputs("cpu")
    with cuda_runtime(11), omnifix.lean_dispatch(toy, device_map=device_map) as lean:
        assert lean.devices == ("cuda:1", "cuda:2", "cuda:10")  # by index, not by spelling
        assert toy.hf_device_map == device_map
        assert hooked(toy)["layers.1"] == "cuda:10"
        assert toy(ids, mask)["logits"].device == torch.device("cpu")


def test_each_entry_makes_its_gpu_current_and_the_callers_comes_back(fake_gpus: None) -> None:
    toy = toy_on(split_placement(["cuda:0", "cuda:1"], embed_tokens="cuda:1"))
    ids, mask = toy_inputs("cpu")
    with cuda_runtime() as calls:
        omnifix.lean_dispatch(toy)
        toy(ids, mask)
        # The root makes the embedding's GPU current, each layer its own, then the caller's
        # comes back.
        assert calls == [1, 0, 1, 0]
        calls.clear()
        toy.head.weight = None  # a forward that raises: the caller's GPU still comes back
        with pytest.raises(TypeError):
            toy(ids, mask)
        assert calls[-1] == 0


def test_lean_dispatch_names_itself_when_given_no_module() -> None:
    with pytest.raises(omnifix.UnsupportedModelError, match=r"^lean_dispatch needs a torch"):
        omnifix.lean_dispatch("Qwen/Qwen2-7B")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("offloaded", "shown"),
    [
        (4, "layers.0: disk, layers.1: disk, layers.2: disk, layers.3: disk next"),
        (5, "layers.0: disk, layers.1: disk, layers.2: disk, layers.3: disk and 1 more next"),
    ],
)
def test_an_offloading_map_is_refused_naming_four_entries_and_the_gpus(
    offloaded: int, shown: str
) -> None:
    toy = build_toy(offloaded)
    toy.hf_device_map = split_placement(["disk"] * offloaded, embed_tokens="cuda:10")
    toy.hf_device_map["rotary_emb"] = "cuda:2"
    with pytest.raises(omnifix.InvalidArgumentError) as caught:
        omnifix.lean_dispatch(toy)
    assert str(caught.value).startswith(
        f"The device_map offloads {shown} to entries on cuda:1, cuda:2, cuda:10: "
    )
    toy.hf_device_map = {"": "disk"}
    with pytest.raises(omnifix.InvalidArgumentError, match=r"offloads \(root\): disk next to "):
        omnifix.lean_dispatch(toy)


def test_a_recorded_map_may_place_single_tensors(fake_gpus: None) -> None:
    placement = split_placement(["cuda:0", "cuda:1"])
    toy = toy_on(placement)
    del placement["layers.0"]
    placement.update({"layers.0.linear.weight": "cuda:0", "layers.0.linear.bias": "cuda:0"})
    toy.hf_device_map = placement
    with omnifix.lean_dispatch(toy) as lean:
        assert lean.devices == ("cuda:0", "cuda:1")
        # A tensor's entry gets no hook: its module runs where its caller's tensors are.
        assert set(hooked(toy)) == {"", *placement} - {
            "layers.0.linear.weight",
            "layers.0.linear.bias",
        }


def test_a_model_without_token_embedding_takes_inputs_on_its_first_entrys_device(
    fake_gpus: None,
) -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    placement = {"0": "cuda:1", "1": "cuda:0"}
    for name, device in placement.items():
        place(model.get_submodule(name), device)
    model.hf_device_map = placement
    with omnifix.lean_dispatch(model):
        assert model._hf_hook.execution_device == torch.device("cuda:1")
        assert model(torch.zeros(2, 4)).device == torch.device("cpu")
