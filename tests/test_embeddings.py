"""omnifix.pin_embeddings on real tiny models, real accelerate dispatch, and a faked second GPU."""

from __future__ import annotations

import copy
import pickle
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifix

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import torch
    from torch import nn

    from omnifix.testing import Family

# transformers models are untyped at the seams we touch (``model.model.embed_tokens`` ...), so
# tests hold them as ``Any``; ``nn.Module`` is kept where the code relies on it alone.
Model = Any

HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def hook_keys(module: Model) -> dict[str, list[int]]:
    return {name: list(getattr(module, name)) for name in HOOK_DICTS}


def load(path: Path, **kwargs: object) -> Model:
    from transformers import AutoModelForCausalLM

    model: Model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


def ids_tensor() -> torch.Tensor:
    import torch

    return torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def logits(model: Model, ids: torch.Tensor | None = None) -> torch.Tensor:
    import torch

    with torch.no_grad():
        result: torch.Tensor = model(input_ids=ids_tensor() if ids is None else ids).logits
    return result


def layer_device_map(model: Model, disk: tuple[str, ...] = ()) -> dict[str, str]:
    """A cpu device_map with one entry per decoder layer; the modules in ``disk`` go to disk."""
    from torch import nn

    mapping: dict[str, str] = {}
    for name, child in model.model.named_children():
        if isinstance(child, nn.ModuleList):
            mapping.update({f"model.{name}.{index}": "cpu" for index in range(len(child))})
        else:
            mapping[f"model.{name}"] = "cpu"
    mapping["lm_head"] = "cpu"
    mapping.update(dict.fromkeys(disk, "disk"))
    return mapping


@pytest.fixture(scope="module")
def lm(tiny_lm_dir: Path) -> Model:
    """One loaded tiny LM shared by tests that leave it unpinned when they finish."""
    return load(tiny_lm_dir)


# --- finding and pinning -------------------------------------------------------------------


def test_pins_the_input_embedding_by_name(lm: Model) -> None:
    before = hook_keys(lm.model.embed_tokens)
    with omnifix.pin_embeddings(lm) as pin:
        assert pin.modules == ("model.embed_tokens",)
        assert pin.device is None
        assert "model.embed_tokens" in repr(pin)
        assert "active=True" in repr(pin)
        assert hook_keys(lm.model.embed_tokens) != before
    assert not pin.active
    assert "active=False" in repr(pin)
    assert hook_keys(lm.model.embed_tokens) == before


def test_logits_identical_with_and_without_pin(lm: Model) -> None:
    import torch

    reference = logits(lm)
    with omnifix.pin_embeddings(lm):
        pinned = logits(lm)
    assert torch.equal(pinned, reference)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(min_value=0, max_value=127), min_size=1, max_size=6),
        min_size=1,
        max_size=3,
    ).filter(lambda rows: len({len(row) for row in rows}) == 1),
    as_kwarg=st.booleans(),
    explicit_device=st.booleans(),
)
def test_embedding_output_identical_for_any_ids(
    lm: Model, rows: list[list[int]], as_kwarg: bool, explicit_device: bool
) -> None:
    import torch

    embedding = lm.get_input_embeddings()
    ids = torch.tensor(rows)
    reference = embedding(ids)
    with omnifix.pin_embeddings(lm, device="cpu" if explicit_device else None):
        pinned = embedding(input=ids) if as_kwarg else embedding(ids)
    assert pinned.device == ids.device
    assert torch.equal(pinned, reference)


def test_state_dict_keys_and_values_identical(lm: Model) -> None:
    import torch

    before = lm.state_dict()
    with omnifix.pin_embeddings(lm):
        during = lm.state_dict()
    assert list(during) == list(before)
    for key, value in before.items():
        assert during[key].data_ptr() == value.data_ptr()  # the very same storage
        assert torch.equal(during[key], value)
    assert list(lm.state_dict()) == list(before)


def test_save_pretrained_writes_the_same_tensors(lm: Model, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    lm.save_pretrained(tmp_path / "plain")
    with omnifix.pin_embeddings(lm):
        lm.save_pretrained(tmp_path / "pinned")
    plain_files = sorted(path.name for path in (tmp_path / "plain").iterdir())
    assert plain_files == sorted(path.name for path in (tmp_path / "pinned").iterdir())
    for name in plain_files:
        if name.endswith(".safetensors"):
            plain = load_file(tmp_path / "plain" / name)
            pinned = load_file(tmp_path / "pinned" / name)
            assert plain.keys() == pinned.keys()
            assert all(torch.equal(plain[key], pinned[key]) for key in plain)
        else:
            plain_text = (tmp_path / "plain" / name).read_text()
            assert plain_text == (tmp_path / "pinned" / name).read_text()


def test_tied_lm_head_stays_tied(tied_lm_dir: Path, tmp_path: Path) -> None:
    import torch

    model = load(tied_lm_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = logits(model)
    with omnifix.pin_embeddings(model):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert torch.equal(logits(model), reference)
        model.save_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reloaded = load(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits(reloaded), reference)


def test_bare_embedding_can_be_pinned() -> None:
    import torch
    from torch import nn

    embedding = nn.Embedding(8, 4)
    with omnifix.pin_embeddings(embedding) as pin:
        assert pin.modules == ("",)
        assert torch.equal(embedding(torch.tensor([1, 2])), embedding.weight[[1, 2]])


def test_no_embedding_raises_unsupported_model_error() -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(omnifix.UnsupportedModelError, match=r"owns the token embedding\.$"):
        omnifix.pin_embeddings(model)
    with pytest.raises(TypeError, match=r"from_pretrained\)\.$"):
        omnifix.pin_embeddings("Qwen/Qwen2-VL-2B-Instruct")  # type: ignore[arg-type]
    assert hook_keys(model[0]) == {name: [] for name in HOOK_DICTS}


# --- idempotence, ownership and removal ----------------------------------------------------


def test_double_pin_adds_no_hook_and_owners_are_counted(lm: Model) -> None:
    import torch

    embedding = lm.model.embed_tokens
    reference = logits(lm)
    original = hook_keys(embedding)
    first = omnifix.pin_embeddings(lm)
    once = hook_keys(embedding)
    assert once != original
    second = omnifix.pin_embeddings(lm)
    assert hook_keys(embedding) == once
    assert second.modules == first.modules
    assert torch.equal(logits(lm), reference)
    second.remove()
    assert hook_keys(embedding) == once  # the first pin still holds the hooks
    assert torch.equal(logits(lm), reference)
    second.remove()  # removing twice is a no-op, it does not release the first pin's share
    assert hook_keys(embedding) == once
    first.remove()
    assert hook_keys(embedding) == original
    assert "_omnifix_embedding_pin" not in embedding.__dict__


def test_second_pin_in_a_with_block_leaves_the_outer_pin(lm: Model) -> None:
    embedding = lm.model.embed_tokens
    original = hook_keys(embedding)
    outer = omnifix.pin_embeddings(lm)
    pinned = hook_keys(embedding)
    with omnifix.pin_embeddings(lm):
        pass
    assert hook_keys(embedding) == pinned
    outer.remove()
    assert hook_keys(embedding) == original


def test_remove_restores_existing_hooks_exactly(lm: Model) -> None:
    embedding = lm.model.embed_tokens
    calls: list[str] = []
    user_pre = embedding.register_forward_pre_hook(lambda *_: calls.append("pre"))
    user_post = embedding.register_forward_hook(lambda *_: calls.append("post"), with_kwargs=True)
    try:
        before = hook_keys(embedding)
        with omnifix.pin_embeddings(lm):
            logits(lm)
        assert calls == ["pre", "post"]  # the user's hooks still run under the pin
        assert hook_keys(embedding) == before
    finally:
        user_pre.remove()
        user_post.remove()


def test_context_manager_unpins_when_the_block_raises(lm: Model) -> None:
    original = hook_keys(lm.model.embed_tokens)
    with pytest.raises(KeyError), omnifix.pin_embeddings(lm):
        raise KeyError
    assert hook_keys(lm.model.embed_tokens) == original


def test_pinning_to_another_device_is_refused_and_pins_nothing(lm: Model) -> None:
    embedding = lm.model.embed_tokens
    original = hook_keys(embedding)
    with omnifix.pin_embeddings(lm):
        pinned = hook_keys(embedding)
        with pytest.raises(omnifix.DeviceError, match=r"pin with device=None\.$"):
            omnifix.pin_embeddings(lm, device="cpu")
        assert hook_keys(embedding) == pinned
    assert hook_keys(embedding) == original


def test_bad_device_is_a_device_error(lm: Model) -> None:
    with pytest.raises(omnifix.DeviceError):
        omnifix.pin_embeddings(lm, device="cdua")
    assert "_omnifix_embedding_pin" not in lm.model.embed_tokens.__dict__


def test_copies_of_a_pinned_model_work_and_can_be_unpinned(lm: Model) -> None:
    import torch

    reference = logits(lm)
    with omnifix.pin_embeddings(lm):
        clone = copy.deepcopy(lm)
        unpickled = pickle.loads(pickle.dumps(lm))  # noqa: S301 - our own bytes
    for other in (clone, unpickled):
        embedding = other.model.embed_tokens
        assert "_omnifix_embedding_pin" in embedding.__dict__  # a copy keeps the pin ...
        assert torch.equal(logits(other), reference)
        pinned = hook_keys(embedding)
        assert pinned["_forward_pre_hooks"]
        omnifix.pin_embeddings(other).remove()  # ... owned by no handle until pinned again
        assert hook_keys(embedding) == {name: [] for name in HOOK_DICTS}
        assert torch.equal(logits(other), reference)
    assert hook_keys(lm.model.embed_tokens) == {name: [] for name in HOOK_DICTS}


# --- accelerate: dispatch_model and from_pretrained offload --------------------------------


@pytest.mark.parametrize("pin_first", [True, False], ids=["pin-then-dispatch", "dispatch-then-pin"])
def test_composes_with_dispatch_model_over_cpu_and_disk(
    tiny_lm_dir: Path, tmp_path: Path, pin_first: bool
) -> None:
    import torch
    from accelerate import dispatch_model

    model = load(tiny_lm_dir)
    reference = logits(model)
    original = hook_keys(model.model.embed_tokens)
    device_map = layer_device_map(model, disk=("model.embed_tokens", "model.layers.1"))
    pin = omnifix.pin_embeddings(model) if pin_first else None
    dispatch_model(model, device_map=device_map, offload_dir=tmp_path)
    if pin is None:
        pin = omnifix.pin_embeddings(model)
    embedding = model.model.embed_tokens
    assert embedding.weight.device.type == "meta"  # really offloaded, behind accelerate's hook
    assert embedding._hf_hook.offload
    assert torch.equal(logits(model), reference)
    pin.remove()
    assert hook_keys(embedding) == original
    assert torch.equal(logits(model), reference)


def test_survives_accelerate_hooks_removed_after_pinning(tiny_lm_dir: Path) -> None:
    import torch
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    model = load(tiny_lm_dir)
    reference = logits(model)
    original = hook_keys(model.model.embed_tokens)
    dispatch_model(model, device_map=layer_device_map(model), force_hooks=True)
    with omnifix.pin_embeddings(model):
        assert hasattr(model.model.embed_tokens, "_hf_hook")
        remove_hook_from_module(model, recurse=True)
        assert not hasattr(model.model.embed_tokens, "_hf_hook")
        assert torch.equal(logits(model), reference)
    assert hook_keys(model.model.embed_tokens) == original


def test_composes_with_from_pretrained_disk_offload(tiny_lm_dir: Path, tmp_path: Path) -> None:
    import torch

    reference = logits(load(tiny_lm_dir))
    plain = load(tiny_lm_dir)
    device_map = layer_device_map(plain, disk=("model.embed_tokens", "model.layers.2"))
    model = load(tiny_lm_dir, device_map=device_map, offload_folder=tmp_path)
    embedding = model.get_input_embeddings()
    assert embedding.weight.device.type == "meta"
    assert embedding._hf_hook.offload
    original = hook_keys(embedding)
    with omnifix.pin_embeddings(model) as pin:
        assert pin.modules == ("model.embed_tokens",)
        assert torch.equal(logits(model), reference)
    assert hook_keys(embedding) == original


# --- crossing devices ----------------------------------------------------------------------
# This machine has no second GPU, and cpu is the only real device. torch's FakeTensorMode lets
# tensors claim any device (cuda:0, cuda:1) without memory behind them and propagates devices
# through every op with the same checks as the real kernels: mixing devices raises "Expected all
# tensors to be on the same device". So these tests run the real hooks, the real accelerate
# AlignDevicesHook and real torch ops across two claimed GPUs; only the numbers are absent.
# Autograd cannot handle fake CUDA tensors on a CPU-only build, hence no_grad and frozen weights.

IMAGE_TOKEN = 7
IMAGE_TOKENS_PER_ROW = 2


@pytest.fixture
def fake_gpus() -> Iterator[None]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.no_grad():
        yield


class TinyVLM:
    """The Qwen2-VL merge, reduced: embed the ids, then scatter image features where the ids say."""

    def __init__(self, embedding_device: str) -> None:
        from torch import nn

        self.model: Any = nn.Module()
        self.model.embed_tokens = nn.Embedding(16, 4, device=embedding_device).requires_grad_(
            requires_grad=False
        )

    def merge(self, ids: torch.Tensor) -> torch.Tensor:
        import torch

        inputs_embeds: torch.Tensor = self.model.embed_tokens(ids)
        mask = (ids == IMAGE_TOKEN).unsqueeze(-1).expand(*ids.shape, 4)
        # Fake tensors hold no values, so the feature count comes from the ids we build.
        features = torch.zeros(IMAGE_TOKENS_PER_ROW * ids.shape[0], 4, device=ids.device)
        return inputs_embeds.masked_scatter(mask, features)


def vlm_ids() -> torch.Tensor:
    import torch

    return torch.tensor([[1, IMAGE_TOKEN, IMAGE_TOKEN, 2]], device="cuda:0")


def test_seed_bug_behind_accelerate_hook_is_fixed(fake_gpus: None) -> None:
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    vlm = TinyVLM("cuda:1")
    hook = AlignDevicesHook(execution_device=torch.device("cuda:1"))
    add_hook_to_module(vlm.model.embed_tokens, hook)
    with pytest.raises(RuntimeError, match="same device"):
        vlm.merge(vlm_ids())  # the seed's masked_scatter failure
    with omnifix.pin_embeddings(vlm.model):
        assert vlm.merge(vlm_ids()).device == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="same device"):
        vlm.merge(vlm_ids())  # unpinned again


def test_hookless_placement_moves_ids_and_returns_embeddings(fake_gpus: None) -> None:
    import torch

    vlm = TinyVLM("cuda:1")
    with pytest.raises(RuntimeError, match="same device"):
        vlm.model.embed_tokens(vlm_ids())  # index_select across devices
    with omnifix.pin_embeddings(vlm.model):
        assert vlm.model.embed_tokens(vlm_ids()).device == torch.device("cuda:0")
        assert vlm.model.embed_tokens(input=vlm_ids()).device == torch.device("cuda:0")
        assert vlm.merge(vlm_ids()).device == torch.device("cuda:0")


def test_explicit_device_receives_the_embeddings(fake_gpus: None) -> None:
    import torch

    vlm = TinyVLM("cuda:1")
    with omnifix.pin_embeddings(vlm.model, device="cpu") as pin:
        assert pin.device == torch.device("cpu")
        assert vlm.model.embed_tokens(vlm_ids()).device == torch.device("cpu")


def test_execution_device_is_read_at_call_time(fake_gpus: None) -> None:
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from torch import nn

    vlm = TinyVLM("cuda:1")
    embedding: Any = vlm.model.embed_tokens
    with omnifix.pin_embeddings(vlm.model):
        assert vlm.merge(vlm_ids()).device == torch.device("cuda:0")
        # Re-placed after pinning: a pin that cached cuda:1 would now fail in index_select.
        embedding.weight = nn.Parameter(embedding.weight.to("cuda:2"), requires_grad=False)
        assert vlm.merge(vlm_ids()).device == torch.device("cuda:0")
        # An accelerate hook added after pinning runs inside the pin ... (accelerate cannot move
        # fake parameters between devices, so the hook names the device the weight is on.)
        add_hook_to_module(embedding, AlignDevicesHook(execution_device=torch.device("cuda:2")))
        assert hasattr(embedding, "_hf_hook")
        assert vlm.merge(vlm_ids()).device == torch.device("cuda:0")
        # ... and removing it leaves the pin working.
        remove_hook_from_module(embedding)
        assert vlm.merge(vlm_ids()).device == torch.device("cuda:0")
    assert hook_keys(embedding) == {name: [] for name in HOOK_DICTS}


# --- every tiny Qwen family ----------------------------------------------------------------


def _families() -> tuple[Family, ...]:
    import omnifix.testing

    return omnifix.testing.available_families()


def language_model_embeddings(model: Model) -> list[nn.Module]:
    """What each language model of ``model`` says its input embedding is (Omni: two of them)."""
    if hasattr(model, "thinker") and hasattr(model, "talker"):
        return [model.thinker.get_input_embeddings(), model.talker.get_input_embeddings()]
    return [model.get_input_embeddings()]


@pytest.mark.parametrize("family", _families())
def test_every_family_pins_its_language_models_and_keeps_outputs(family: Family) -> None:
    import torch

    import omnifix.testing

    model: Model = omnifix.testing.tiny_model(family)
    model.eval()
    inputs = omnifix.testing.tiny_inputs(family, model.config)
    generate_kwargs = omnifix.testing.text_generation_kwargs(family)
    # The full Omni class has no forward of its own: its thinker computes the logits.
    forward = model.thinker if family == "qwen2.5-omni" else model
    with torch.no_grad():
        reference = forward(**inputs).logits
        generated = model.generate(**inputs, **generate_kwargs)
        with omnifix.pin_embeddings(model) as pin:
            pinned = [model.get_submodule(name) for name in pin.modules]
            assert [id(module) for module in pinned] == [
                id(module) for module in language_model_embeddings(model)
            ]
            assert torch.equal(forward(**inputs).logits, reference)
            assert torch.equal(model.generate(**inputs, **generate_kwargs), generated)


def test_refusals_name_pin_embeddings() -> None:
    with pytest.raises(omnifix.UnsupportedModelError, match=r"^pin_embeddings needs a torch\.nn"):
        omnifix.pin_embeddings(None)  # type: ignore[arg-type]


def test_removing_a_pin_after_its_model_is_gone_is_quiet(lm: Model) -> None:
    import gc

    model = copy.deepcopy(lm)
    pin = omnifix.pin_embeddings(model)
    del model
    gc.collect()
    pin.remove()
    assert not pin.active


def test_tuple_outputs_and_extra_arguments_cross_devices(fake_gpus: None) -> None:
    import torch
    from torch import nn

    class PairEmbedding(nn.Embedding):
        """An embedding subclass with a second positional argument and a tuple output."""

        def forward(self, ids: torch.Tensor, keep: bool = False) -> Any:  # type: ignore[override]
            embeds = super().forward(ids)
            return embeds, embeds.sum(-1, keepdim=keep)

    embedding = PairEmbedding(16, 4, device="cuda:1").requires_grad_(requires_grad=False)
    with omnifix.pin_embeddings(embedding):
        embeds, sums = embedding(vlm_ids(), True)  # noqa: FBT003 - a positional argument
    assert embeds.device == sums.device == torch.device("cuda:0")
    assert sums.shape == (1, 4, 1)  # the second argument reached the embedding


def test_the_pin_moves_ids_before_hooks_registered_earlier(fake_gpus: None) -> None:
    import torch

    vlm = TinyVLM("cuda:1")
    seen: list[torch.device] = []
    vlm.model.embed_tokens.register_forward_pre_hook(lambda _, args: seen.append(args[0].device))
    with omnifix.pin_embeddings(vlm.model):
        vlm.model.embed_tokens(vlm_ids())
    assert seen == [torch.device("cuda:1")]  # where the embedding runs, not where ids came from
