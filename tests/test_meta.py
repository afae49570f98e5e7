"""find_meta_tensors / assert_no_meta on real accelerate offloads, broken checkpoints, skeletons."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import omnifix

if TYPE_CHECKING:
    from pathlib import Path


def _tf_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def _meta_names(model: nn.Module) -> set[str]:
    """What torch itself says is on meta (tied weights once, as named_parameters reports them)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name for name, tensor in tensors if tensor.is_meta}


def _device_map_value(device_map: dict[str, object], name: str) -> object:
    """Longest-prefix lookup, the way accelerate reads hf_device_map."""
    matches = [key for key in device_map if key in ("", name) or name.startswith(key + ".")]
    return device_map[max(matches, key=len)]


def _check_cpu_entries(report: omnifix.MetaReport, model: nn.Module) -> None:
    """A "cpu" hf_device_map entry is reported offloaded exactly when torch shows its tensors on
    meta (accelerate offloads "cpu" entries only when the model's main device is a GPU)."""
    meta = _meta_names(model)
    for entry, value in model.hf_device_map.items():
        if value == "cpu":
            under = {name for name in meta if name.startswith(entry + ".")}
            assert (entry in report.offloaded_device_map) == bool(under), entry


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _load(path: Path, **kwargs: object) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.fixture(scope="module")
def disk_offloaded(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """The tiny LM loaded with device_map="auto" and a cpu budget a third of its size: accelerate
    keeps what fits on the cpu and offloads the rest to disk behind hooks."""
    size = (tiny_lm_dir / "model.safetensors").stat().st_size
    return _load(
        tiny_lm_dir,
        device_map="auto",
        max_memory={"cpu": size // 3},
        offload_folder=str(tmp_path_factory.mktemp("offload")),
    )


@pytest.fixture
def broken_checkpoint(tiny_lm_dir: Path, tmp_path: Path) -> tuple[Path, set[str]]:
    """A copy of the tiny LM whose safetensors file lacks three keys."""
    import shutil

    from safetensors.torch import save_file

    path = tmp_path / "broken"
    shutil.copytree(tiny_lm_dir, path)
    state = _checkpoint(path)
    dropped = {"model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"}
    save_file(
        {k: v for k, v in state.items() if k not in dropped},
        path / "model.safetensors",
        {"format": "pt"},
    )
    return path, dropped


def test_offloaded_weight_breaks_outside_forward_and_assert_no_meta_names_it_first(
    disk_offloaded: nn.Module,
) -> None:
    # What a user hits: forward works (the hooks load the weights) ...
    logits = disk_offloaded(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 128)
    assert torch.isfinite(logits).all()
    # ... but reading an offloaded weight anywhere else fails deep inside torch.
    with pytest.raises(RuntimeError, match="meta tensors"):
        disk_offloaded.lm_head.weight.sum().item()
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        disk_offloaded.lm_head.weight.tolist()

    # assert_no_meta refuses the model up front, naming modules and the fix.
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(disk_offloaded)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "offloaded by accelerate (to disk)" in message
    assert "uninitialised" not in message
    assert "offloaded to disk" in message
    assert "model.layers." in message
    assert "Offloaded hf_device_map entries: " in message
    last = message.splitlines()[-1]
    assert last.startswith("Fix: ")
    assert 'device_map="cuda"' in last
    assert "allow_offload=True" in last


def test_report_of_disk_offload_matches_accelerate_and_the_checkpoint(
    disk_offloaded: nn.Module, tiny_lm_dir: Path
) -> None:
    device_map = disk_offloaded.hf_device_map
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    report = omnifix.find_meta_tensors(disk_offloaded)

    names = {tensor.name for tensor in report.tensors}
    assert names == _meta_names(disk_offloaded)
    # Exactly the tensors of modules the device_map sends to disk are offloaded, and to disk.
    checkpoint = _checkpoint(tiny_lm_dir)
    on_disk = {name for name in checkpoint if _device_map_value(device_map, name) == "disk"}
    assert names == on_disk
    assert report.offloaded == report.tensors
    assert report.uninitialised == ()
    for tensor in report.tensors:
        assert tensor.offloaded_to == "disk"
        assert not tensor.is_buffer
        stored = checkpoint[tensor.name]
        assert (tensor.shape, tensor.dtype, tensor.nbytes) == (
            tuple(stored.shape),
            stored.dtype,
            stored.numel() * stored.element_size(),
        )
    assert report.total_bytes == sum(checkpoint[name].nbytes for name in on_disk)
    # On a cpu-only map accelerate runs "cpu" modules in place: only "disk" entries are offloaded.
    assert report.offloaded_device_map == {k: v for k, v in device_map.items() if v == "disk"}
    _check_cpu_entries(report, disk_offloaded)
    assert report
    table = str(report)
    assert table.splitlines()[0].startswith(f"{len(names)} tensors are on the meta device")
    assert "... and " in table


def test_allow_offload_accepts_a_model_that_is_only_offloaded(disk_offloaded: nn.Module) -> None:
    assert omnifix.assert_no_meta(disk_offloaded, allow_offload=True) is None
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning, match="allow_offload="):
        assert omnifix.assert_no_meta(disk_offloaded, allow_offloaded=True) is None


def test_missing_keys_in_disk_offloaded_modules_are_uninitialised_not_offloaded(
    broken_checkpoint: tuple[Path, set[str]], tmp_path: Path
) -> None:
    path, dropped = broken_checkpoint
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
        "model.norm": "disk",
        "lm_head": "disk",
    }
    model = _load(path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    # Every stack leaves the missing keys on meta behind an offload hook that has no data for
    # them: hf_device_map says "disk", yet forward dies on the first one.
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        model(torch.tensor([[1, 2, 3]]))

    report = omnifix.find_meta_tensors(model)
    assert {tensor.name for tensor in report.uninitialised} == dropped
    assert all(tensor.offloaded_to is None for tensor in report.uninitialised)
    offloaded = {tensor.name for tensor in report.offloaded}
    assert offloaded
    assert offloaded.isdisjoint(dropped)
    assert offloaded | dropped == _meta_names(model)
    assert all(_device_map_value(device_map, name) == "disk" for name in offloaded)

    # Uninitialised tensors raise even when offloading is allowed; the fix is about the checkpoint.
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(model, allow_offload=True)
    message = str(caught.value)
    assert message.startswith("3 tensors are on the meta device (")
    for name in dropped:
        assert name in message
    assert f"({len(offloaded)} offloaded tensors were allowed.)" in message
    assert "Offloaded hf_device_map entries: model.layers.1: disk" in message
    assert message.splitlines()[-1].startswith("Fix: load the weights")
    assert "missing_keys" in message.splitlines()[-1]
    assert "allow_offload" not in message.splitlines()[-1]


def test_missing_keys_with_low_cpu_mem_usage_follow_each_transformers_version(
    broken_checkpoint: tuple[Path, set[str]],
) -> None:
    path, dropped = broken_checkpoint
    model = _load(path, low_cpu_mem_usage=True)
    report = omnifix.find_meta_tensors(model)
    # 4.45 leaves missing keys on meta (and does not even list them as missing);
    # 4.57 and 5.x initialise them, so nothing is left on meta.
    expected = dropped if _tf_version() < (4, 46) else set()
    assert {tensor.name for tensor in report.uninitialised} == expected
    assert report.offloaded == ()
    assert _meta_names(model) == expected
    if expected:
        with pytest.raises(omnifix.MetaTensorError, match=r"lm_head\.weight"):
            omnifix.assert_no_meta(model, allow_offload=True)
    else:
        omnifix.assert_no_meta(model)


def test_init_empty_weights_skeleton_is_entirely_uninitialised(tiny_lm_dir: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_lm_dir)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    report = omnifix.find_meta_tensors(skeleton)

    checkpoint = _checkpoint(tiny_lm_dir)
    assert {tensor.name for tensor in report.tensors} == set(checkpoint)
    assert report.uninitialised == report.tensors
    assert report.total_bytes == sum(tensor.nbytes for tensor in checkpoint.values())
    # init_empty_weights leaves buffers (rotary inv_freq) real: they are not reported.
    assert not any(tensor.is_buffer for tensor in report.tensors)
    assert report.offloaded_device_map == {}
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(skeleton, allow_offload=True)
    message = str(caught.value)
    assert f"{len(checkpoint)} uninitialised (no data anywhere)" in message.splitlines()[0]
    assert "init_empty_weights()" in message.splitlines()[-1]


def test_clean_load_has_no_meta_tensors(tiny_lm_dir: Path) -> None:
    model = _load(tiny_lm_dir)
    report = omnifix.find_meta_tensors(model)
    assert report.tensors == ()
    assert not report
    assert report.total_bytes == 0
    assert str(report) == "no meta tensors"
    omnifix.assert_no_meta(model)


def test_cpu_offload_is_offloaded_to_cpu_and_runs(tiny_lm_dir: Path) -> None:
    from accelerate import cpu_offload

    reference = _load(tiny_lm_dir)
    expected = reference(torch.tensor([[1, 2, 3]])).logits
    model = cpu_offload(_load(tiny_lm_dir), execution_device=torch.device("cpu"))

    report = omnifix.find_meta_tensors(model)
    assert {tensor.name for tensor in report.tensors} == {
        n for n, _ in reference.named_parameters()
    }
    assert {tensor.offloaded_to for tensor in report.tensors} == {"cpu"}
    assert report.uninitialised == ()
    torch.testing.assert_close(model(torch.tensor([[1, 2, 3]])).logits, expected)
    with pytest.raises(omnifix.MetaTensorError, match="offloaded by accelerate \\(to cpu\\)"):
        omnifix.assert_no_meta(model)


def test_hook_that_places_submodules_covers_their_tensors(tiny_lm_dir: Path) -> None:
    from accelerate import cpu_offload

    # preload_module_classes puts one hook on each MLP that loads its children's weights.
    model = cpu_offload(
        _load(tiny_lm_dir),
        execution_device=torch.device("cpu"),
        preload_module_classes=["Qwen2MLP"],
    )
    mlp = model.model.layers[0].mlp
    assert not hasattr(mlp.up_proj, "_hf_hook")
    assert mlp.up_proj.weight.is_meta
    report = omnifix.find_meta_tensors(model)
    by_name = {tensor.name: tensor for tensor in report.tensors}
    assert by_name["model.layers.0.mlp.up_proj.weight"].offloaded_to == "cpu"
    assert report.uninitialised == ()
    assert set(by_name) == _meta_names(model)


def test_disk_offloaded_buffers_count_only_when_the_hook_offloads_buffers(tmp_path: Path) -> None:
    from accelerate import disk_offload

    def build() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        model[1].register_buffer("scratch", torch.zeros(3), persistent=False)
        return model.eval()

    offloaded = disk_offload(
        build(), str(tmp_path / "a"), execution_device="cpu", offload_buffers=True
    )
    report = omnifix.find_meta_tensors(offloaded)
    buffers = {tensor.name for tensor in report.tensors if tensor.is_buffer}
    assert buffers == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert {tensor.offloaded_to for tensor in report.tensors} == {"disk"}
    assert {tensor.name for tensor in report.tensors} == _meta_names(offloaded)
    assert offloaded(torch.ones(2, 4)).shape == (2, 4)

    # Without offload_buffers accelerate keeps buffers on the execution device: only params.
    kept = disk_offload(build(), str(tmp_path / "b"), execution_device="cpu")
    assert {tensor.name for tensor in omnifix.find_meta_tensors(kept).tensors} == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    }

    # A meta buffer a hook does not load (offload_buffers=False) has no data anywhere.
    kept[1].running_mean = torch.empty(4, device="meta")
    report = omnifix.find_meta_tensors(kept)
    assert [tensor.name for tensor in report.uninitialised] == ["1.running_mean"]
    assert report.uninitialised[0].is_buffer


def test_tied_weights_are_reported_once(tiny_lm_dir: Path, tmp_path: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_lm_dir, tie_word_embeddings=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # from_config under init_empty_weights leaves them untied
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    report = omnifix.find_meta_tensors(skeleton)
    names = [tensor.name for tensor in report.tensors]
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names
    assert report.total_bytes == sum(p.numel() * p.element_size() for p in skeleton.parameters())

    # A real tied checkpoint (lm_head.weight is not even stored) with both ends on disk.
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    device_map = {
        "model.embed_tokens": "disk",
        "model.layers": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    model = _load(tmp_path / "tied", device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = omnifix.find_meta_tensors(model)
    embed = [tensor for tensor in report.tensors if tensor.shape == (128, 32)]
    assert [(t.name, t.kind, t.offloaded_to) for t in embed] == [
        ("model.embed_tokens.weight", "offloaded", "disk")
    ]
    assert {tensor.name for tensor in report.tensors} == _meta_names(model)


def test_error_lists_five_names_and_human_sizes() -> None:
    with torch.device("meta"):
        huge = nn.Linear(32768, 32768, bias=False)
        many = nn.Sequential(*(nn.Linear(8, 8) for _ in range(8)))
    with pytest.raises(
        omnifix.MetaTensorError, match=r"^1 tensor is on the meta device \(4\.0 GiB\)"
    ):
        omnifix.assert_no_meta(huge)

    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(many)
    lines = str(caught.value).splitlines()
    assert lines[0] == (
        "16 tensors are on the meta device (2.2 KiB): 16 uninitialised (no data anywhere)."
    )
    assert lines[1].split() == ["tensor", "kind", "shape", "dtype", "where"]
    listed = [line.split()[0] for line in lines[2:7]]
    assert listed == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]
    assert lines[7] == "... and 11 more"
    assert lines[-1].startswith("Fix: ")


@settings(max_examples=25, deadline=None)
@given(on_meta=st.sets(st.integers(min_value=0, max_value=5)), tie=st.booleans())
def test_report_matches_torch_for_any_set_of_meta_modules(on_meta: set[int], tie: bool) -> None:
    model = nn.Sequential(
        *(nn.Linear(3, 3) for _ in range(4)), nn.BatchNorm1d(3), nn.Embedding(5, 3)
    )
    if tie:
        model[5].weight = model[0].weight  # a tied weight, seen under two names
    for index in sorted(on_meta):
        model[index].to("meta")
    report = omnifix.find_meta_tensors(model)
    assert {tensor.name for tensor in report.tensors} == _meta_names(model)
    assert len(report.tensors) == len(_meta_names(model))
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.is_meta}
    assert report.total_bytes == sum(t.numel() * t.element_size() for t in unique.values())
    assert bool(report) == bool(unique)


def _towers(model: nn.Module) -> list[str]:
    """The outermost vision/audio encoders, found by their own config class (not by name)."""
    found: list[str] = []
    for name, module in model.named_modules():
        config_name = type(getattr(module, "config", None)).__name__
        if config_name.endswith(("VisionConfig", "EncoderConfig")) and not any(
            name.startswith(tower + ".") for tower in found
        ):
            found.append(name)
    return found


def _tower_on_disk_map(model: nn.Module, towers: list[str]) -> dict[str, str]:
    """A complete device_map: each tower on "disk", every other branch on "cpu"."""
    device_map: dict[str, str] = {}

    def visit(module: nn.Module, name: str) -> None:
        if name in towers:
            device_map[name] = "disk"
        elif not any(name == "" or tower.startswith(name + ".") for tower in towers):
            device_map[name] = "cpu"
        else:
            assert not list(module.parameters(recurse=False)), name
            for child, sub in module.named_children():
                visit(sub, f"{name}.{child}" if name else child)

    visit(model, "")
    return device_map


def _multimodal_families() -> list[str]:
    import omnifix.testing as ot

    return [family for family in ot.available_families() if family != "qwen2"]


@pytest.fixture(params=_multimodal_families())
def tower_on_disk(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, nn.Module, list[str]]:
    """A tiny multimodal model loaded with its vision/audio towers offloaded to disk."""
    from accelerate import init_empty_weights

    import omnifix.testing as ot

    family = request.param
    path = ot.save_tiny_model(family, tmp_path / family)
    cls = ot.model_class(family)
    with init_empty_weights():
        skeleton = cls(ot.tiny_config(family))
    towers = _towers(skeleton)
    assert towers, family
    device_map = _tower_on_disk_map(skeleton, towers)
    model = cls.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "off"))
    return family, model.eval(), towers


def test_offloaded_vision_and_audio_towers_are_reported(
    tower_on_disk: tuple[str, nn.Module, list[str]],
) -> None:
    family, model, towers = tower_on_disk
    report = omnifix.find_meta_tensors(model)
    assert report.uninitialised == ()
    names = {tensor.name for tensor in report.tensors}
    assert names == _meta_names(model)
    in_towers = {
        name
        for name, _ in model.named_parameters()
        if any(name.startswith(tower + ".") for tower in towers)
    }
    assert in_towers
    assert names == in_towers
    assert {tensor.offloaded_to for tensor in report.tensors} == {"disk"}
    assert report.offloaded_device_map == dict.fromkeys(towers, "disk")

    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(model)
    for tower in towers:
        assert f"{tower}: disk" in str(caught.value)
    assert str(caught.value).splitlines()[2].startswith(tuple(towers))
    if family == "qwen2-audio":
        # Qwen2-Audio's encoder reads embed_positions.weight directly, outside any hooked
        # forward: with the tower offloaded even forward() dies on a meta tensor.
        import omnifix.testing as ot

        with pytest.raises(NotImplementedError, match="meta tensor"):
            model(**ot.tiny_inputs(family, model.config))


_GPU_MAP = {
    "model.embed_tokens": 0,
    "model.rotary_emb": 0,
    "model.layers.0": 0,
    "model.layers.1": "cpu",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit-map", "auto-map"])
def test_gpu_offload_to_cpu_and_disk(tiny_lm_dir: Path, tmp_path: Path, explicit: bool) -> None:
    size = (tiny_lm_dir / "model.safetensors").stat().st_size
    kwargs: dict[str, object] = (
        {"device_map": _GPU_MAP}
        if explicit
        else {"device_map": "auto", "max_memory": {0: size // 4, "cpu": size // 2}}
    )
    model = _load(tiny_lm_dir, offload_folder=str(tmp_path / "offload"), **kwargs)
    device_map = model.hf_device_map
    if explicit:
        assert device_map == _GPU_MAP
    report = omnifix.find_meta_tensors(model)
    assert report.uninitialised == ()
    assert {tensor.name for tensor in report.tensors} == _meta_names(model)
    for tensor in report.tensors:
        assert tensor.offloaded_to == _device_map_value(device_map, tensor.name)
    assert {k: v for k, v in report.offloaded_device_map.items() if v == "disk"} == {
        k: v for k, v in device_map.items() if v == "disk"
    }
    _check_cpu_entries(report, model)
    if explicit:
        # With a GPU as main device accelerate offloads "cpu" entries too.
        assert report.offloaded_device_map == {
            k: v for k, v in device_map.items() if v in ("cpu", "disk")
        }
        assert {tensor.offloaded_to for tensor in report.tensors} == {"cpu", "disk"}
        with pytest.raises(omnifix.MetaTensorError) as caught:
            omnifix.assert_no_meta(model)
        assert "offloaded by accelerate (to cpu and disk)" in str(caught.value)
        assert "model.layers.1: cpu" in str(caught.value)
    assert model(torch.tensor([[1, 2, 3]], device="cuda:0")).logits.shape == (1, 3, 128)
    omnifix.assert_no_meta(model, allow_offload=True)


def test_a_non_persistent_meta_buffer_is_uninitialised_even_behind_an_offload_hook() -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    with torch.device("meta"):
        linear = nn.Linear(4, 2)
    real = {"weight": torch.ones(2, 4), "bias": torch.zeros(2), "scale": torch.ones(2)}
    hook = AlignDevicesHook(execution_device="cpu", offload=True, offload_buffers=True)
    hook.weights_map = real  # accelerate's pre_forward loads persistent tensors only
    add_hook_to_module(linear, hook)
    linear.register_buffer("scale", torch.empty(2, device="meta"), persistent=False)
    kinds = {t.name: t.kind for t in omnifix.find_meta_tensors(linear).tensors}
    assert kinds == {"weight": "offloaded", "bias": "offloaded", "scale": "uninitialised"}


# ---------------------------------------------------------------------------------------------
# accelerate's weights maps, read without loading, and the report built from them
# ---------------------------------------------------------------------------------------------


def _offload(module: nn.Module, weights_map: object, **kwargs: object) -> nn.Module:
    """``module`` on meta behind an offloading hook that loads from ``weights_map``."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    module.to("meta")
    hook = AlignDevicesHook(execution_device="cpu", offload=True, **kwargs)
    hook.weights_map = weights_map
    add_hook_to_module(module, hook)
    return module


def _where(report: omnifix.MetaReport) -> dict[str, tuple[str, str | None]]:
    return {tensor.name: (tensor.kind, tensor.offloaded_to) for tensor in report.tensors}


def test_each_kind_of_weights_map_says_what_it_holds_and_where() -> None:
    from types import MappingProxyType

    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    # What accelerate builds for cpu and disk entries under a GPU: one loader, a prefix a module.
    loader = OffloadedWeightsLoader(
        state_dict={"0.weight": torch.ones(2, 4), "0.bias": torch.empty(2, device="meta")},
        index={"0.bias": {"dtype": "float32", "shape": [2]}},
    )
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    _offload(model[0], PrefixedDataset(loader, "0."))
    _offload(model[1], PrefixedDataset(loader, "1."))  # nothing of it in the loader
    # cpu_offload's own copy: a dict; a meta value in it is no data either.
    _offload(model[2], {"weight": torch.ones(2, 2), "bias": torch.empty(2, device="meta")})
    # Any other mapping: membership is the only truthful check, and says nothing of where.
    _offload(model[3], MappingProxyType({"weight": torch.ones(2, 2)}))
    assert _where(omnifix.find_meta_tensors(model)) == {
        "0.weight": ("offloaded", "cpu"),
        "0.bias": ("offloaded", "disk"),
        "1.weight": ("uninitialised", None),
        "1.bias": ("uninitialised", None),
        "2.weight": ("offloaded", "cpu"),
        "2.bias": ("uninitialised", None),
        "3.weight": ("offloaded", None),
        "3.bias": ("uninitialised", None),
    }


def test_a_weights_map_of_unknown_type_is_placed_by_the_recorded_device_map() -> None:
    from types import MappingProxyType

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    for module in model:
        _offload(module, MappingProxyType({"weight": torch.ones(2, 2)}))
    model.hf_device_map = {"0": "cuda:0", "1": "disk", "2": "cpu"}
    report = omnifix.find_meta_tensors(model)
    assert _where(report) == {
        "0.weight": ("offloaded", None),  # a GPU entry says nothing about where its data is
        "0.bias": ("uninitialised", None),
        "1.weight": ("offloaded", "disk"),
        "1.bias": ("uninitialised", None),
        "2.weight": ("offloaded", "cpu"),
        "2.bias": ("uninitialised", None),
    }
    assert report.offloaded_device_map == {"1": "disk", "2": "cpu"}
    # An empty recorded map records nothing.
    model.hf_device_map = {}
    report = omnifix.find_meta_tensors(model)
    assert report.offloaded_device_map == {}
    assert {tensor.offloaded_to for tensor in report.offloaded} == {None}
    assert "offloaded by accelerate (to unknown place)" in str(report)


def test_a_tied_weight_is_reported_once_as_offloaded_when_either_name_has_data() -> None:
    real = {"weight": torch.ones(4, 4), "bias": torch.zeros(4)}
    # First seen with no data, then behind an offload hook: offloaded, under its first name.
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4))
    model[0].to("meta")
    _offload(model[1], real)
    model[1].weight = model[0].weight  # tied (the hook's own placement unties)
    assert _where(omnifix.find_meta_tensors(model)) == {
        "0.weight": ("offloaded", "cpu"),
        "1.bias": ("offloaded", "cpu"),
    }
    # First seen offloaded, then again without data: still offloaded, and the module's other
    # tensors are still looked at.
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4))
    _offload(model[0], real)
    model[1].to("meta")
    model[1].weight = model[0].weight
    assert _where(omnifix.find_meta_tensors(model)) == {
        "0.weight": ("offloaded", "cpu"),
        "1.bias": ("uninitialised", None),
    }


def test_only_offloading_hooks_count_and_every_tensor_of_a_module_is_looked_at() -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    add_hook_to_module(model[0].to("meta"), ModelHook())  # a hook that loads nothing
    model[1].bias = nn.Parameter(torch.empty(2, device="meta"))  # a real weight, then a meta bias
    assert _where(omnifix.find_meta_tensors(model)) == {
        "0.weight": ("uninitialised", None),
        "0.bias": ("uninitialised", None),
        "1.bias": ("uninitialised", None),
    }


def test_the_report_lists_uninitialised_tensors_first_with_kind_shape_dtype_and_place(
    tmp_path: Path,
) -> None:
    from accelerate import disk_offload
    from rich.console import Console

    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 3, bias=False), nn.BatchNorm1d(3))
    _offload(model[0], {"weight": torch.ones(2, 4), "bias": torch.zeros(2)})
    disk_offload(model[1], str(tmp_path), execution_device="cpu")
    model[2].weight = nn.Parameter(torch.empty(3, dtype=torch.float16, device="meta"))
    model[2].running_mean = torch.empty(3, device="meta")
    report = omnifix.find_meta_tensors(model)
    lines = str(report).splitlines()
    assert lines[0] == (
        "5 tensors are on the meta device (82 B): 3 offloaded by accelerate (to cpu and disk), "
        "2 uninitialised (no data anywhere)."
    )
    assert [line.split() for line in lines[1:]] == [
        ["tensor", "kind", "shape", "dtype", "where"],
        ["2.weight", "param", "(3,)", "float16", "uninitialised"],
        ["2.running_mean", "buffer", "(3,)", "float32", "uninitialised"],
        ["0.weight", "param", "(2,", "4)", "float32", "offloaded", "to", "cpu"],
        ["0.bias", "param", "(2,)", "float32", "offloaded", "to", "cpu"],
        ["1.weight", "param", "(3,", "2)", "float32", "offloaded", "to", "disk"],
    ]
    console = Console(record=True, width=200)
    console.print(report)
    assert console.export_text().splitlines()[0] == lines[0]


@pytest.mark.parametrize(("layers", "more"), [(5, None), (6, "... and 2 more")])
def test_the_table_shows_ten_tensors_then_says_how_many_more(layers: int, more: str | None) -> None:
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(layers)))
    lines = str(omnifix.find_meta_tensors(model)).splitlines()
    assert len(lines) == 2 + 10 + (more is not None)
    assert (lines[-1] == more) if more else lines[-1].startswith("4.bias ")


@pytest.mark.parametrize(("entries", "listed"), [(8, ""), (10, " and 2 more")])
def test_the_error_lists_eight_offloaded_entries_then_says_how_many_more(
    entries: int, listed: str
) -> None:
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(entries)))
    model.hf_device_map = {str(i): "disk" for i in range(entries)}
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(model)
    shown = ", ".join(f"{i}: disk" for i in range(8))
    assert f"Offloaded hf_device_map entries: {shown}{listed}.\n" in str(caught.value)


def test_the_error_explains_and_fixes_each_kind_it_refuses_and_carries_the_report() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    _offload(model[0], {"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    model[1].to("meta")
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(model)
    lines = str(caught.value).splitlines()
    assert caught.value.report == omnifix.find_meta_tensors(model)
    assert not any("were allowed" in line for line in lines)  # none was
    assert lines[-3].startswith("Offloaded tensors hold data only inside forward()")
    assert lines[-2].startswith("Uninitialised tensors have no data anywhere")
    assert lines[-1].startswith("Fix: load the weights they need")
    assert "; and give the model room so nothing is offloaded" in lines[-1]
    assert lines[-1].endswith("pass allow_offload=True knowingly.")
    # Allowed, the offloaded ones are counted and neither explained nor fixed.
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(model, allow_offload=True)
    lines = str(caught.value).splitlines()
    assert "(2 offloaded tensors were allowed.)" in lines
    assert not any(line.startswith("Offloaded tensors hold") for line in lines)
    assert caught.value.report.offloaded == omnifix.find_meta_tensors(model).offloaded


def test_the_deprecated_spelling_names_its_replacement() -> None:
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning) as caught:
        omnifix.assert_no_meta(nn.Linear(2, 2), allow_offloaded=True)
    assert str(caught[0].message) == (
        "assert_no_meta(allow_offloaded=...) is deprecated and goes in the next 0.x release: "
        "use allow_offload=...."
    )


def test_find_meta_tensors_names_itself_when_given_no_module() -> None:
    with pytest.raises(omnifix.UnsupportedModelError, match=r"^find_meta_tensors needs a torch"):
        omnifix.find_meta_tensors("Qwen/Qwen2-7B")  # type: ignore[arg-type]
