"""normalize_device, resolve_device_map and input_device.

Machines are simulated by patching torch's own availability probes (``torch.cuda.is_available``,
``torch.cuda.device_count``, ...), so the GPU branches run on CPU CI. Models are real: a tiny
Qwen2 saved to disk (``tiny_lm_dir``) and loaded with ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import omnifix
from omnifix._devices import cuda_device_count

if TYPE_CHECKING:
    from collections.abc import Iterator


@contextlib.contextmanager
def simulated(
    *,
    cuda: int = 0,
    cuda_current: int = 0,
    rocm: bool = False,
    mps: bool = False,
    xpu: int = 0,
    xpu_current: int = 0,
) -> Iterator[None]:
    """Make torch's probes describe a machine with these devices (and no torch_npu).

    torch.accelerator names one accelerator per process; the simulated machine's is its first
    of cuda, xpu and mps.
    """
    best = "cuda" if cuda else "xpu" if xpu else "mps" if mps else None
    current = {"cuda": cuda_current, "xpu": xpu_current}.get(best or "", 0)
    with contextlib.ExitStack() as stack:

        def patch(target: Any, name: str, value: Any) -> None:
            stack.enter_context(mock.patch.object(target, name, value))

        patch(torch.accelerator, "is_available", lambda: best is not None)
        patch(torch.accelerator, "current_accelerator", lambda *_: best and torch.device(best))
        patch(torch.accelerator, "current_device_index", lambda: current)
        patch(torch.accelerator, "device_count", lambda: {"cuda": cuda, "xpu": xpu}.get(best, 1))
        patch(torch.cuda, "is_available", lambda: cuda > 0)
        patch(torch.cuda, "device_count", lambda: cuda)
        patch(torch.cuda, "current_device", lambda: cuda_current)
        patch(torch.version, "hip", "6.2.41133" if rocm else None)
        patch(torch.backends.mps, "is_available", lambda: mps)
        if hasattr(torch, "xpu"):
            patch(torch.xpu, "is_available", lambda: xpu > 0)
            patch(torch.xpu, "device_count", lambda: xpu)
            patch(torch.xpu, "current_device", lambda: xpu_current)
        # None in sys.modules blocks the import: torch_npu is absent whatever is installed.
        stack.enter_context(mock.patch.dict(sys.modules, {"torch_npu": None}))
        yield


CPU_BOX: dict[str, Any] = {}
TWO_GPUS = {"cuda": 2, "cuda_current": 1}
MACHINES: list[dict[str, Any]] = [
    CPU_BOX,
    {"cuda": 1},
    TWO_GPUS,
    {"cuda": 2, "rocm": True},
    {"mps": True},
    {"xpu": 3, "xpu_current": 2},
    {"xpu": 1, "mps": True},
    {"cuda": 8, "cuda_current": 5, "xpu": 2, "mps": True},
]


def counts(machine: dict[str, Any]) -> dict[str, int]:
    return {
        "cpu": 1,
        "cuda": machine.get("cuda", 0),
        "xpu": machine.get("xpu", 0),
        "mps": int(machine.get("mps", False)),
    }


# ---------------------------------------------------------------------------------------------
# normalize_device on simulated machines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "request_", "expected"),
    [
        (CPU_BOX, "auto", torch.device("cpu")),
        (CPU_BOX, None, torch.device("cpu")),
        (CPU_BOX, " CPU:0 ", torch.device("cpu")),
        (TWO_GPUS, "auto", torch.device("cuda", 1)),  # the *current* GPU, not cuda:0
        (TWO_GPUS, "cuda", torch.device("cuda", 1)),
        (TWO_GPUS, "gpu", torch.device("cuda", 1)),
        (TWO_GPUS, torch.device("cuda"), torch.device("cuda", 1)),
        (TWO_GPUS, 0, torch.device("cuda", 0)),
        (TWO_GPUS, "cuda:0", torch.device("cuda", 0)),
        (TWO_GPUS, "gpu:0", torch.device("cuda", 0)),
        (TWO_GPUS, "cpu", torch.device("cpu")),
        ({"cuda": 2, "rocm": True}, "rocm", torch.device("cuda", 0)),
        ({"cuda": 2, "rocm": True}, "hip:1", torch.device("cuda", 1)),
        ({"mps": True}, "auto", torch.device("mps", 0)),
        ({"mps": True}, "mps", torch.device("mps", 0)),
        ({"xpu": 3, "xpu_current": 2}, "auto", torch.device("xpu", 2)),
        ({"xpu": 3, "xpu_current": 2}, "xpu:0", torch.device("xpu", 0)),
        ({"xpu": 1, "mps": True}, "auto", torch.device("xpu", 0)),  # xpu before mps
        ({"cuda": 1, "xpu": 1, "mps": True}, "auto", torch.device("cuda", 0)),  # cuda first
    ],
)
def test_normalize_device_resolves_to_the_real_indexed_device(machine, request_, expected):
    with simulated(**machine):
        assert omnifix.normalize_device(request_) == expected


@pytest.mark.parametrize(
    ("machine", "request_", "listed"),
    [
        (CPU_BOX, "cuda", "can use: cpu."),
        (CPU_BOX, "gpu", "can use: cpu."),
        (CPU_BOX, 0, "can use: cpu."),
        (TWO_GPUS, "cuda:7", "can use: cuda:0, cuda:1, cpu."),
        (TWO_GPUS, 2, "can use: cuda:0, cuda:1, cpu."),
        (TWO_GPUS, torch.device("cuda", 5), "can use: cuda:0, cuda:1, cpu."),
        (TWO_GPUS, "rocm", "can use: cuda:0, cuda:1, cpu."),  # a CUDA build is not ROCm
        ({"mps": True}, "cuda", "can use: mps, cpu."),
        ({"mps": True}, "mps:1", "can use: mps, cpu."),
        ({"xpu": 2}, "xpu:2", "can use: xpu:0, xpu:1, cpu."),
        (CPU_BOX, "npu", "can use: cpu."),
        (CPU_BOX, "cpu:1", "can use: cpu."),
    ],
)
def test_missing_devices_raise_unavailable_listing_what_exists(machine, request_, listed):
    with simulated(**machine), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        omnifix.normalize_device(request_)
    message = str(caught.value)
    assert listed in message
    assert message.endswith((".", "?"))
    assert "'auto'" in message or "Pass" in message  # the message ends with what to do
    assert isinstance(caught.value, ValueError)
    # The error names what was asked for, and carries it and what there is.
    assert message.startswith(f"{request_!r} is not available: ")
    assert caught.value.requested == request_
    assert listed == f"can use: {', '.join(caught.value.available)}."


def test_unavailable_cuda_index_says_how_many_gpus_are_visible():
    with simulated(cuda=2), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        omnifix.normalize_device("cuda:7")
    assert "sees 2 cuda devices" in str(caught.value)
    assert str(caught.value).endswith("Pass an index below 2, or 'auto'.")
    with simulated(cuda=1), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        omnifix.normalize_device("cuda:1")
    assert "sees 1 cuda device (only cuda:0;" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("cuda0", "Did you mean 'cuda:0'?"),
        ("gpu_1", "Did you mean 'gpu:1'?"),
        ("cdua", "Did you mean 'cuda'?"),
        ("cdua:1", "Did you mean 'cuda:1'?"),
        ("cpux", "Did you mean 'cpu'?"),
        ("cuda:-1", "indices are >= 0"),
        ("cuda:x", "a whole number >= 0"),
        ("cuda:1:0", "a whole number >= 0"),
        ("auto:0", "takes no index"),
        ("", "the string is empty"),
        ("🚀", "Write one of 'auto', 'cpu', 'cuda'"),
    ],
)
def test_malformed_strings_raise_device_error_with_the_closest_spelling(text, hint):
    with simulated(cuda=2), pytest.raises(omnifix.DeviceError) as caught:
        omnifix.normalize_device(text)
    assert not isinstance(caught.value, omnifix.DeviceUnavailableError)
    assert hint in str(caught.value)


@pytest.mark.parametrize(
    ("request_", "explains"),
    [
        ("meta", "shapes but no data"),
        (torch.device("meta"), "shapes but no data"),
        ("disk", "offload target"),
        ("balanced", "device_map strategy"),
        ("sequential", "device_map strategy"),
        (-1, "indices are >= 0"),
        (True, "booleans"),
        (1.0, "of type float"),
        (torch.tensor(0.5), "not a whole number"),
    ],
)
def test_device_map_words_and_non_devices_are_refused_with_an_explanation(request_, explains):
    with simulated(cuda=2), pytest.raises(omnifix.DeviceError) as caught:
        omnifix.normalize_device(request_)
    assert explains in str(caught.value)


def test_npu_is_picked_when_torch_npu_registers_it():
    # Renaming torch's privateuse1 backend is permanent for a process, as importing torch_npu
    # is, so this runs in a child interpreter that stands in for an Ascend machine.
    script = textwrap.dedent(
        """
        import sys, types, torch
        torch.utils.rename_privateuse1_backend("npu")
        torch.npu = types.SimpleNamespace(
            is_available=lambda: True, device_count=lambda: 2, current_device=lambda: 1
        )
        sys.modules["torch_npu"] = types.ModuleType("torch_npu")
        torch.cuda.is_available = lambda: False
        torch.accelerator.is_available = lambda: True
        torch.accelerator.current_accelerator = lambda *_: torch.device("npu")
        torch.accelerator.current_device_index = lambda: 1
        torch.backends.mps.is_available = lambda: False
        if hasattr(torch, "xpu"):
            torch.xpu.is_available = lambda: False
        import omnifix
        print(omnifix.normalize_device("auto"), omnifix.normalize_device("NPU:0"))
        print(omnifix.resolve_device_map("npu"))
        try:
            omnifix.normalize_device("npu:2")
        except omnifix.DeviceUnavailableError as error:
            print(error)
        """
    )
    package_root = str(
        Path(omnifix.__file__).parents[1]
    )  # the omnifix under test, installed or not
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(  # noqa: S603  # our own interpreter running the fixed script above
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "npu:1 npu:0"
    assert lines[1] == (
        "ResolvedDevice(device_map={'': 'npu:1'}, input_device=device(type='npu', index=1))"
    )
    assert "sees 2 npu devices" in lines[2]
    assert "can use: npu:0, npu:1, cpu." in lines[2]


def test_npu_without_torch_npu_says_to_install_it():
    with simulated(), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        omnifix.normalize_device("npu:0")
    assert "torch_npu" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

WORDS = [
    "auto", "cpu", "cuda", "gpu", "mps", "xpu", "npu", "rocm", "hip", "meta", "disk",
    "balanced", "sequential", "cdua", "hpu", "xla", "mkldnn", "CUDA", " cpu ", "privateuseone",
]  # fmt: skip
device_strings = st.builds(
    lambda word, sep, index: word if sep is None else f"{word}{sep}{index}",
    st.sampled_from(WORDS),
    st.sampled_from([None, ":", "", " : "]),
    st.integers(-2, 12),
)
torch_devices = st.builds(
    torch.device,
    st.sampled_from(["cpu", "cuda", "xpu", "mps", "meta", "hip", "hpu"]),
    st.none() | st.integers(0, 12),
)
device_likes = st.one_of(st.none(), st.text(), device_strings, st.integers(), torch_devices)


@settings(deadline=None)
@given(device_likes)
def test_on_this_machine_results_are_real_and_stable(request_):
    try:
        device = omnifix.normalize_device(request_)
    except omnifix.OmnifixError:
        return  # only omnifix errors may escape: anything else fails the test
    assert omnifix.normalize_device(device) == device
    assert torch.empty(0, device=device).device == device


@settings(deadline=None)
@given(st.sampled_from(MACHINES), device_likes)
def test_on_simulated_machines_results_are_well_formed_and_stable(machine, request_):
    with simulated(**machine):
        try:
            device = omnifix.normalize_device(request_)
        except omnifix.OmnifixError:
            return
        assert omnifix.normalize_device(device) == device
    available = counts(machine)
    assert device.type in available
    if device.type == "cpu":
        assert device.index is None
    else:
        assert device.index is not None
        assert 0 <= device.index < available[device.type]


@settings(deadline=None)
@given(st.sampled_from(MACHINES), device_likes)
def test_resolve_device_map_never_hands_out_a_map_word_as_input_device(machine, request_):
    with simulated(**machine):
        try:
            device_map, device = omnifix.resolve_device_map(request_)
        except omnifix.OmnifixError:
            return
    assert device is None or (isinstance(device, torch.device) and device.type != "meta")
    if isinstance(device_map, dict):
        assert device is not None
        assert device_map == {"": device.type if device.type in {"cpu", "mps"} else str(device)}
    else:
        assert device is None
        assert device_map in {"auto", "balanced", "balanced_low_0", "sequential"}


# ---------------------------------------------------------------------------------------------
# resolve_device_map
# ---------------------------------------------------------------------------------------------


def test_xinference_bug_device_map_auto_is_not_an_input_device():
    # Xinference's Qwen2-Audio loader (v1.2.2-v1.6.0) stored device_map "auto" as the input
    # device; the first request then did this:
    with pytest.raises(RuntimeError, match="auto"):
        torch.ones(1).to("auto")
    with simulated(**TWO_GPUS):
        device_map, device = omnifix.resolve_device_map("cuda")
    assert device_map == "auto"
    assert device is None  # known only once loaded: ask input_device(model)


@pytest.mark.parametrize(
    ("machine", "request_", "expected"),
    [
        (CPU_BOX, "auto", ({"": "cpu"}, torch.device("cpu"))),
        (CPU_BOX, None, ({"": "cpu"}, torch.device("cpu"))),
        ({"cuda": 1}, "auto", ({"": "cuda:0"}, torch.device("cuda", 0))),
        ({"cuda": 1}, "cuda", ({"": "cuda:0"}, torch.device("cuda", 0))),
        (TWO_GPUS, "auto", ("auto", None)),
        (TWO_GPUS, None, ("auto", None)),
        (TWO_GPUS, "cuda", ("auto", None)),
        (TWO_GPUS, "GPU", ("auto", None)),
        (TWO_GPUS, "cuda:0", ({"": "cuda:0"}, torch.device("cuda", 0))),
        (TWO_GPUS, 1, ({"": "cuda:1"}, torch.device("cuda", 1))),
        (TWO_GPUS, "cpu", ({"": "cpu"}, torch.device("cpu"))),
        ({"cuda": 2, "rocm": True}, "rocm", ("auto", None)),
        ({"mps": True}, "auto", ({"": "mps"}, torch.device("mps", 0))),
        ({"xpu": 2}, "xpu:1", ({"": "xpu:1"}, torch.device("xpu", 1))),
        (TWO_GPUS, "balanced", ("balanced", None)),
        (TWO_GPUS, "balanced_low_0", ("balanced_low_0", None)),
        (CPU_BOX, "sequential", ("sequential", None)),
    ],
)
def test_resolve_device_map_splits_map_and_input_device(machine, request_, expected):
    with simulated(**machine):
        resolved = omnifix.resolve_device_map(request_)
    assert resolved == expected
    assert (resolved.device_map, resolved.input_device) == expected


@pytest.mark.parametrize(
    ("plan", "normalized", "device"),
    [
        (  # two GPUs and an offload: modules execute on two devices, so the input is unknown
            {"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "CPU"},
            {"model.embed_tokens": "cuda:0", "model.layers": "cuda:1", "lm_head": "cpu"},
            None,
        ),
        (  # accelerate runs "cpu"/"disk" modules on the main device (first non-offload one)
            {"model.embed_tokens": "cpu", "model.layers": 1, "lm_head": "disk"},
            {"model.embed_tokens": "cpu", "model.layers": "cuda:1", "lm_head": "disk"},
            torch.device("cuda", 1),
        ),
        (  # "cuda" is the current GPU (1 here), so both values are one device
            {"model": "cuda", "lm_head": torch.device("cuda", 1)},
            {"model": "cuda:1", "lm_head": "cuda:1"},
            torch.device("cuda", 1),
        ),
        (  # CPU-only map: everything computes on the CPU
            {"model.embed_tokens": "cpu", "model.layers": "disk"},
            {"model.embed_tokens": "cpu", "model.layers": "disk"},
            torch.device("cpu"),
        ),
    ],
)
def test_device_map_dicts_pass_through_normalized(plan, normalized, device):
    with simulated(**TWO_GPUS):
        resolved = omnifix.resolve_device_map(plan)
    assert resolved.device_map == normalized
    assert resolved.input_device == device


@pytest.mark.parametrize(
    ("plan", "error", "says"),
    [
        ({"model": "meta"}, omnifix.DeviceError, "device_map['model']: 'meta'"),
        ({"model": "auto"}, omnifix.DeviceError, "not a placement"),
        ({"model": None}, omnifix.DeviceError, "not a placement"),
        ({"model": "cuda:7"}, omnifix.DeviceUnavailableError, "device_map['model']: 'cuda:7'"),
        ({"model": "cdua:0"}, omnifix.DeviceError, "Did you mean 'cuda:0'?"),
        ({0: "cpu"}, omnifix.DeviceError, "not a module name"),
        ({}, omnifix.DeviceError, "places no module"),
    ],
)
def test_invalid_device_map_dicts_are_refused(plan, error, says):
    with simulated(**TWO_GPUS), pytest.raises(error) as caught:
        omnifix.resolve_device_map(plan)
    assert says in str(caught.value)


@pytest.mark.parametrize("word", ["meta", "disk"])
def test_resolve_device_map_refuses_meta_and_disk_for_a_whole_model(word):
    with simulated(**TWO_GPUS), pytest.raises(omnifix.DeviceError, match=word):
        omnifix.resolve_device_map(word)


@pytest.mark.parametrize(
    ("machine", "main", "offloaded", "inputs"),
    [
        # accelerate's dispatch_model: a main device of mps (or cpu) offloads only "disk" entries;
        # its "cpu" entries are moved to the main device and compute there.
        ({"mps": True}, "mps", {"lm_head": "disk"}, torch.device("mps", 0)),
        ({"cuda": 1}, "cuda:0", {"model.norm": "cpu", "lm_head": "disk"}, torch.device("cuda", 0)),
    ],
)
def test_one_offload_rule_for_maps_meta_reports_and_lean_hooks(
    machine, main, offloaded, inputs, tiny_lm_dir
):
    device_map = {"model.embed_tokens": main, "model.norm": "cpu", "lm_head": "disk"}
    with simulated(**machine):
        resolved = omnifix.resolve_device_map(device_map)
        assert resolved.input_device == inputs
        model = load(tiny_lm_dir)  # on the cpu; only its recorded map is read below
        vars(model)["hf_device_map"] = resolved.device_map
        assert omnifix.find_meta_tensors(model).offloaded_device_map == offloaded
        with pytest.raises(omnifix.InvalidArgumentError, match="offloads lm_head: disk"):
            omnifix.lean_dispatch(model)


# ---------------------------------------------------------------------------------------------
# Real loads: the dict form works with from_pretrained, and input_device finds the inputs' home
# ---------------------------------------------------------------------------------------------

IDS = torch.tensor([[1, 2, 3, 4]])
OFFLOAD_EMBEDDING = {
    "model.embed_tokens": "disk",
    "model.layers": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def load(path: Path, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


def runs_with_inputs_on(model: nn.Module, device: torch.device) -> bool:
    with torch.no_grad():
        logits = model(IDS.to(device)).logits
    return bool(torch.isfinite(logits).all())


def test_input_device_of_a_plain_load_is_where_the_weights_are(tiny_lm_dir):
    model = load(tiny_lm_dir)
    assert omnifix.input_device(model) == torch.device("cpu") == model.device
    assert runs_with_inputs_on(model, omnifix.input_device(model))


def test_resolved_single_device_map_loads_on_every_stack(tiny_lm_dir):
    device_map, device = omnifix.resolve_device_map("cpu")
    model = load(tiny_lm_dir, device_map=device_map)
    assert {p.device for p in model.parameters()} == {device}
    assert omnifix.input_device(model) == device


def test_offloaded_embedding_model_device_is_meta_but_input_device_is_right(tiny_lm_dir, tmp_path):
    device_map, expected = omnifix.resolve_device_map(OFFLOAD_EMBEDDING)
    model = load(tiny_lm_dir, device_map=device_map, offload_folder=tmp_path)
    # Reproduce first: model.device is the first parameter's device, the offloaded embedding's.
    assert model.device == torch.device("meta")
    with pytest.raises(NotImplementedError, match="meta"):
        runs_with_inputs_on(model, model.device)
    assert omnifix.input_device(model) == expected == torch.device("cpu")
    assert runs_with_inputs_on(model, omnifix.input_device(model))


def test_auto_map_with_max_memory_offloads_to_disk_and_inputs_go_to_cpu(tiny_lm_dir, tmp_path):
    model = load(
        tiny_lm_dir, device_map="auto", max_memory={"cpu": 100_000}, offload_folder=tmp_path
    )
    assert {"cpu", "disk"} <= set(model.hf_device_map.values())
    assert omnifix.input_device(model) == torch.device("cpu")
    assert runs_with_inputs_on(model, omnifix.input_device(model))


def test_cpu_offloaded_embedding_runs_on_the_hooks_gpu_not_on_meta(tiny_lm_dir):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = load(tiny_lm_dir)
    # What dispatch_model puts on a module mapped to "cpu" when the main device is cuda:0:
    # weights parked off-device (meta here), moved to cuda:0 for each forward.
    embedding = model.get_input_embeddings()
    add_hook_to_module(
        embedding, AlignDevicesHook(execution_device=torch.device("cuda", 0), offload=True)
    )
    assert model.device == torch.device("meta")
    assert omnifix.input_device(model) == torch.device("cuda", 0)


def test_input_device_falls_back_to_hf_device_map_when_hooks_are_gone(tiny_lm_dir, tmp_path):
    from accelerate.hooks import remove_hook_from_module

    model = load(tiny_lm_dir, device_map=OFFLOAD_EMBEDDING, offload_folder=tmp_path)
    remove_hook_from_module(model, recurse=True)
    assert model.get_input_embeddings().weight.device == torch.device("meta")
    # "disk" with only CPU devices in the map: accelerate executes it on the CPU.
    assert omnifix.input_device(model) == torch.device("cpu")
    # A GPU in the map makes it the main device: offloaded modules execute there.
    model.hf_device_map = {**OFFLOAD_EMBEDDING, "model.layers": 0}
    assert omnifix.input_device(model) == torch.device("cuda", 0)
    # Longest prefix wins: an entry for the embedding itself beats its parent's.
    model.hf_device_map = {"model": "disk", "model.embed_tokens": "cuda:1", "lm_head": 0}
    assert omnifix.input_device(model) == torch.device("cuda", 1)


def test_model_built_under_init_empty_weights_raises_meta_tensor_error(tiny_lm_dir):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_lm_dir))
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.input_device(model)
    message = str(caught.value)
    assert message.startswith("The input embedding 'model.embed_tokens' of Qwen2ForCausalLM ")
    assert "init_empty_weights" in message
    assert message.endswith("then ask again.")
    assert isinstance(caught.value, RuntimeError)
    # The error carries the report of what is on meta: every weight of the skeleton.
    names = {tensor.name for tensor in caught.value.report.tensors}
    assert "model.embed_tokens.weight" in names
    assert len(names) == len(list(model.parameters()))


class Wrapped(nn.Module):
    """A model whose embedding sits inside a block, as with preload_module_classes."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))

    def get_input_embeddings(self) -> nn.Module:
        return self.block[0]


def test_embedding_without_its_own_hook_uses_the_enclosing_blocks_hook():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = Wrapped()
    # One hook for the whole block, children's weights parked on meta until it runs.
    add_hook_to_module(
        model.block,
        AlignDevicesHook(
            execution_device=torch.device("cuda", 1), offload=True, place_submodules=True
        ),
    )
    assert model.get_input_embeddings().weight.device == torch.device("meta")
    assert not hasattr(model.get_input_embeddings(), "_hf_hook")
    assert omnifix.input_device(model) == torch.device("cuda", 1)


def test_model_without_token_embedding_uses_its_first_module_with_weights():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = nn.Sequential(nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2))
    assert omnifix.input_device(model) == torch.device("cpu")
    add_hook_to_module(
        model[1], AlignDevicesHook(execution_device=torch.device("xpu", 0), offload=True)
    )
    assert model[1].weight.device == torch.device("meta")
    assert omnifix.input_device(model) == torch.device("xpu", 0)  # hooks first, never meta


def test_model_without_token_embedding_and_without_data_raises_meta_tensor_error():
    model = nn.Sequential(nn.Linear(2, 2)).to("meta")
    with pytest.raises(omnifix.MetaTensorError, match="first module with weights '0'"):
        omnifix.input_device(model)


def test_model_without_any_tensor_is_unsupported():
    with pytest.raises(omnifix.UnsupportedModelError, match="no parameters or buffers"):
        omnifix.input_device(nn.Sequential(nn.ReLU()))


def test_module_without_embedding_may_hold_only_buffers():
    model = nn.BatchNorm1d(3, affine=False)
    assert omnifix.input_device(model) == torch.device("cpu")


def test_simulated_probes_are_restored():
    before = (torch.cuda.is_available(), torch.version.hip, "torch_npu" in sys.modules)
    with simulated(cuda=4, rocm=True):
        assert torch.cuda.is_available()
    assert (torch.cuda.is_available(), torch.version.hip, "torch_npu" in sys.modules) == before


@pytest.mark.parametrize("word", ["rocm", "hip", "ROCm"])
def test_rocm_words_on_an_nvidia_machine_are_unavailable_not_every_gpu(word: str) -> None:
    with simulated(cuda=2), pytest.raises(omnifix.DeviceUnavailableError, match="not a ROCm"):
        omnifix.resolve_device_map(word)
    with simulated(cuda=2, rocm=True):
        assert omnifix.resolve_device_map(word) == ("auto", None)


# ---------------------------------------------------------------------------------------------
# What the errors say, and the machines' less common corners
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        (CPU_BOX, ["cpu"]),
        ({"xpu": 1, "mps": True}, ["xpu:0", "mps", "cpu"]),
        (
            {"cuda": 2, "xpu": 2, "mps": True},
            ["cuda:0", "cuda:1", "xpu:0", "xpu:1", "mps", "cpu"],
        ),
        ({"cuda": 8}, [*(f"cuda:{i}" for i in range(8)), "cpu"]),
        ({"cuda": 10}, [*(f"cuda:{i}" for i in range(8)), "... cuda:9", "cpu"]),
    ],
)
def test_the_devices_listed_are_every_kind_this_machine_has(
    machine: dict[str, Any], expected: list[str]
) -> None:
    with simulated(**machine), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        omnifix.normalize_device("cuda:11")
    assert list(caught.value.available) == expected
    with simulated(**machine):
        assert cuda_device_count() == machine.get("cuda", 0)


def test_a_gpu_the_driver_cannot_open_is_not_counted() -> None:
    # device_count() may count devices that is_available() knows the driver cannot open.
    with simulated(), mock.patch.object(torch.cuda, "device_count", return_value=1):
        assert cuda_device_count() == 0
        with pytest.raises(omnifix.DeviceUnavailableError, match="CPU-only build"):
            omnifix.normalize_device("cuda:0")


@contextlib.contextmanager
def out_of_tree_accelerator(kind: str, count: int, current: int) -> Iterator[None]:
    """A machine whose accelerator is a type torch knows but omnifix has no probe for (hpu)."""
    with simulated(), contextlib.ExitStack() as stack:
        accelerator = torch.accelerator
        patches = {
            "is_available": lambda: True,
            "current_accelerator": lambda *_: torch.device(kind),
            "current_device_index": lambda: current,
            "device_count": lambda: count,
        }
        for name, value in patches.items():
            stack.enter_context(mock.patch.object(accelerator, name, value))
        yield


def test_an_out_of_tree_accelerator_is_found_through_torch_accelerator() -> None:
    with out_of_tree_accelerator("hpu", count=2, current=1):
        assert omnifix.normalize_device("hpu") == torch.device("hpu", 1)
        assert omnifix.normalize_device("HPU:0") == torch.device("hpu", 0)
        assert omnifix.normalize_device("auto") == torch.device("hpu", 1)
        with pytest.raises(omnifix.DeviceUnavailableError) as caught:
            omnifix.normalize_device("hpu:2")
        assert "sees 2 hpu devices (hpu:0 to hpu:1;" in str(caught.value)
        # Another type torch knows is not this machine's accelerator: none of it.
        with pytest.raises(omnifix.DeviceUnavailableError, match="torch sees no xla device"):
            omnifix.normalize_device("xla:0")


@pytest.mark.parametrize(
    ("machine", "request_", "why", "fix"),
    [
        (CPU_BOX, "hpu", "torch sees no hpu device", "Pass 'auto' to use the best device"),
        ({"cuda": 1}, "xpu:0", "torch sees no xpu device", "Pass 'auto' to use the best device"),
        (CPU_BOX, "cuda:0", "this torch is a CPU-only build", "Pass 'auto' to use the best"),
        (
            CPU_BOX,
            "npu:0",
            "Ascend NPUs need the torch_npu package, which is not installed",
            "Install torch_npu, or pass 'auto' to use the best device available.",
        ),
        (CPU_BOX, "cpu:1", "torch has one CPU device", "Pass 'cpu' without an index."),
        ({"mps": True}, "mps:1", "Apple's mps backend has one device", "Pass 'mps' without"),
        ({"cuda": 2}, "cuda:2", "sees 2 cuda devices (cuda:0 to cuda:1;", "Pass an index below 2"),
    ],
)
def test_an_unavailable_device_is_explained_then_fixed(
    machine: dict[str, Any], request_: str, why: str, fix: str
) -> None:
    with simulated(**machine), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        omnifix.normalize_device(request_)
    message = str(caught.value)
    assert message.startswith(f"{request_!r} is not available: ")
    what, _, rest = message.partition(". This process can use: ")
    assert why in what
    assert fix in rest.partition(". ")[2]


@pytest.mark.parametrize(
    ("text", "problem", "fix"),
    [
        ("cdua", "unknown device type", "Did you mean 'cuda'?"),
        ("cdua:x", "unknown device type", "Did you mean 'cuda'?"),
        ("cuda0", "the index must follow a colon", "Did you mean 'cuda:0'?"),
        ("auto0", "the index must follow a colon", "Did you mean 'auto'?"),
        ("\N{ROCKET}:1", "unknown device type", "Write one of 'auto', 'cpu', 'cuda'"),
    ],
)
def test_a_malformed_string_says_what_is_wrong_and_the_closest_spelling(
    text: str, problem: str, fix: str
) -> None:
    with pytest.raises(omnifix.DeviceError) as caught:
        omnifix.normalize_device(text)
    message = str(caught.value)
    assert message.startswith(f"{text!r} is not a device: {problem}. {fix}")


def test_the_default_request_is_auto() -> None:
    with simulated():
        assert omnifix.normalize_device() == torch.device("cpu")
        assert omnifix.resolve_device_map() == ({"": "cpu"}, torch.device("cpu"))
    with simulated(**TWO_GPUS):
        assert omnifix.resolve_device_map() == ("auto", None)


def test_a_meta_device_object_is_named_in_its_refusal() -> None:
    with pytest.raises(omnifix.DeviceError) as caught:
        omnifix.normalize_device(torch.device("meta"))
    assert str(caught.value).startswith("device(type='meta') is not a device you can compute on")


def test_device_map_values_are_read_like_devices_and_errors_keep_what_was_asked() -> None:
    assert omnifix.resolve_device_map({"lm_head": " Disk ", "model": "CPU"}) == (
        {"lm_head": "disk", "model": "cpu"},
        torch.device("cpu"),
    )
    with simulated(), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        omnifix.resolve_device_map({"model": "cpu", "lm_head": "cuda:3"})
    assert caught.value.requested == "cuda:3"
    assert caught.value.available == ("cpu",)
    assert str(caught.value).startswith("device_map['lm_head']: 'cuda:3' is not available")


def test_input_device_is_never_meta_whatever_the_recorded_map_says() -> None:
    model = nn.Sequential(nn.Linear(2, 2)).to("meta")
    model.hf_device_map = {"": "meta"}
    with pytest.raises(omnifix.MetaTensorError, match="first module with weights '0'"):
        omnifix.input_device(model)
    model.hf_device_map = {}
    with pytest.raises(omnifix.MetaTensorError, match="first module with weights '0'"):
        omnifix.input_device(model)


class Nested(nn.Module):
    """An embedding three modules deep: ``outer.inner.embed``."""

    def __init__(self) -> None:
        super().__init__()
        self.outer = nn.Module()
        self.outer.inner = nn.Module()
        self.outer.inner.embed = nn.Embedding(8, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.outer.inner.embed


@pytest.mark.parametrize("hooked", ["outer", "outer.inner"])
def test_the_nearest_hooked_ancestor_of_the_embedding_says_where_it_runs(hooked: str) -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = Nested()
    hook = AlignDevicesHook(execution_device=torch.device("xpu", 1), offload=True)
    hook.place_submodules = True
    add_hook_to_module(model.get_submodule(hooked), hook)
    assert model.get_input_embeddings().weight.is_meta
    assert omnifix.input_device(model) == torch.device("xpu", 1)


def test_a_module_with_only_its_childrens_buffers_is_named_by_the_child() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Module())
    model[1].register_buffer("table", torch.empty(2, device="meta"))
    with pytest.raises(omnifix.MetaTensorError, match="first module with weights '1'"):
        omnifix.input_device(model)


def test_input_device_names_itself_when_given_no_module() -> None:
    with pytest.raises(omnifix.UnsupportedModelError, match=r"^input_device needs a torch"):
        omnifix.input_device("Qwen/Qwen2-7B")  # type: ignore[arg-type]
