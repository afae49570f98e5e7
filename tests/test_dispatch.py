"""omnifix.lean_dispatch on real tiny models, real accelerate hooks, and faked GPUs."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

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
            self.touch_cos = False

        def forward(
            self,
            hidden: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor],
            mask: torch.Tensor,
            past_key_values: object = None,
        ) -> torch.Tensor:
            cos, sin = position_embeddings
            self.seen.append((cos, mask))
            self.cache = past_key_values
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

        def get_input_embeddings(self) -> nn.Module:
            return self.embed_tokens

        def forward(
            self, input_ids: torch.Tensor, mask: torch.Tensor, past_key_values: object = None
        ) -> dict[str, Any]:
            hidden = self.embed_tokens(input_ids)
            position_embeddings = self.rotary_emb(hidden, input_ids)
            for index, layer in enumerate(self.layers):
                hidden = layer(hidden, position_embeddings, mask, past_key_values=past_key_values)
                if index == self.touch_after:
                    position_embeddings[0].mul_(1)  # the parent changes a shared tensor in place
            return {
                "logits": self.head(self.norm(hidden)),
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
