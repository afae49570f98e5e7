"""The Xinference recipe (omnifix.integrations.xinference) against tests/xinference_standin.py.

The stand-in re-implements Xinference's ``select_device``, its device registry and two multimodal
backends from the published source (see its docstring); it is not Xinference. Machines are
simulated by patching torch's own availability probes, as tests/test_devices.py does; models are
the real tiny Qwen2-Audio and Qwen2-VL of ``omnifix.testing``, loaded with ``from_pretrained``.
Weights only ever load on the cpu (this machine's one device): on a simulated GPU machine the
tests check what the backend decides and passes to ``from_pretrained``, and generate only where
the plan is the cpu.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
import torch

import omnifix
import omnifix.testing as ot
from omnifix.integrations.xinference import patch_xinference
from omnifix.types import ResolvedDevice

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType


def _load_standin() -> ModuleType:
    path = Path(__file__).with_name("xinference_standin.py")
    spec = importlib.util.spec_from_file_location("xinference_standin", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


xi = _load_standin()
BACKENDS = (xi.Qwen2AudioChatModel, xi.PytorchQwen2VLModel)


@contextlib.contextmanager
def simulated(*, cuda: int = 0, rocm: bool = False) -> Iterator[None]:
    """Make torch's probes describe a machine with ``cuda`` GPUs (ROCm ones if ``rocm``)."""
    with contextlib.ExitStack() as stack:
        for target, name, value in (
            (torch.cuda, "is_available", lambda: cuda > 0),
            (torch.cuda, "device_count", lambda: cuda),
            (torch.cuda, "current_device", lambda: 0),
            (torch.version, "hip", "6.2.41133" if rocm else None),
            (torch.backends.mps, "is_available", lambda: False),
            (torch.accelerator, "is_available", lambda: cuda > 0),
            (torch.accelerator, "current_accelerator", lambda *_: torch.device("cuda")),
            (torch.accelerator, "current_device_index", lambda: 0),
        ):
            stack.enter_context(mock.patch.object(target, name, value))
        if hasattr(torch, "xpu"):
            stack.enter_context(mock.patch.object(torch.xpu, "is_available", return_value=False))
        stack.enter_context(mock.patch.dict(sys.modules, {"torch_npu": None}))
        yield


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[type[Any], Path]:
    return {
        backend: ot.save_tiny_model(backend.family, tmp_path_factory.mktemp(backend.family))
        for backend in BACKENDS
    }


@pytest.fixture
def recipe() -> Iterator[None]:
    with patch_xinference(*BACKENDS, modules=[xi]):
        yield


def _backend(backend: type[Any], tiny_dirs: dict[type[Any], Path], device: str) -> Any:
    return backend("uid", tiny_dirs[backend], device=device)


@contextlib.contextmanager
def recorded_device_map(backend: type[Any]) -> Iterator[list[object]]:
    """Record the backend's ``device_map``; load the weights on the cpu (the only device here)."""
    model_class = ot.model_class(backend.family)
    plain = model_class.from_pretrained
    seen: list[object] = []

    def from_pretrained(path: Path, **kwargs: Any) -> Any:
        seen.append(kwargs.pop("device_map"))
        return plain(path, **kwargs)

    with mock.patch.object(model_class, "from_pretrained", from_pretrained):
        yield seen


# ------------------------------------------------------------------------------------------------
# The bugs, reproduced on the stand-in
# ------------------------------------------------------------------------------------------------


def test_standin_qwen2_audio_moves_inputs_to_auto(tiny_dirs):
    chat_model = _backend(xi.Qwen2AudioChatModel, tiny_dirs, "auto")
    with simulated(cuda=2):
        chat_model.decide_device()
    assert chat_model._device == "auto"  # the device_map word, stored as the device
    chat_model.load_processor()
    chat_model.load_multimodal_model()  # device_map="auto" loads (on this cpu-only machine)
    with pytest.raises(RuntimeError, match="device string: auto"):
        chat_model.chat([{"role": "user", "content": "hi"}])


def test_standin_rocm_answer_is_a_name_torch_rejects():
    with simulated(cuda=1, rocm=True):
        device = xi.select_device("auto")
    assert device == "rocm"
    with pytest.raises(RuntimeError, match="rocm"):
        torch.device(device)


def test_standin_rejects_an_indexed_gpu():
    with simulated(cuda=2), pytest.raises(ValueError, match="cuda:1 is unavailable"):
        xi.select_device("cuda:1")


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("recipe")
@pytest.mark.parametrize(
    ("machine", "request_", "name"),
    [
        ({"cuda": 2}, "auto", "cuda"),  # several GPUs: "cuda", which backends spread
        ({"cuda": 2}, "cuda:1", "cuda:1"),
        ({"cuda": 1}, "auto", "cuda:0"),
        ({"cuda": 1, "rocm": True}, "auto", "cuda:0"),
        ({"cuda": 2, "rocm": True}, "rocm", "cuda"),
        ({"cuda": 2, "rocm": True}, "hip:1", "cuda:1"),
        ({}, "auto", "cpu"),
    ],
)
def test_recipe_select_device_returns_names_torch_accepts(machine, request_, name):
    with simulated(**machine):
        assert xi.select_device(request_) == name
        assert torch.device(name).type == ("cuda" if machine else "cpu")


@pytest.mark.usefixtures("recipe")
@pytest.mark.parametrize("backend", BACKENDS, ids=["qwen2-audio", "qwen2-vl"])
@pytest.mark.parametrize(
    ("machine", "request_", "expected"),
    [
        ({"cuda": 2}, "auto", ({"cuda", "auto"}, ResolvedDevice("auto", None))),
        (
            {"cuda": 2},
            "cuda:1",
            ({"cuda:1"}, ResolvedDevice({"": "cuda:1"}, torch.device("cuda", 1))),
        ),
        (
            {"cuda": 1, "rocm": True},
            "auto",
            ({"cuda:0"}, ResolvedDevice({"": "cuda:0"}, torch.device("cuda", 0))),
        ),
    ],
)
def test_recipe_on_gpu_machines_plans_apart_and_inputs_follow_the_model(
    tiny_dirs, backend, machine, request_, expected
):
    passed, resolved = expected  # device_map values the backend may pass; how omnifix reads them
    chat_model = _backend(backend, tiny_dirs, request_)
    with simulated(**machine):
        chat_model.decide_device()
        # What the backend will hand to from_pretrained, and how omnifix's patch reads it.
        assert chat_model._omnifix_device == resolved
        assert chat_model._device != "auto"
        with recorded_device_map(backend) as seen:
            chat_model.load_multimodal_model()
        assert seen[0] in passed
        assert omnifix.resolve_device_map(seen[0]) == resolved
    # The weights loaded on the cpu; the input device is the model's, not a device_map word.
    assert chat_model._device == str(omnifix.input_device(chat_model._model)) == "cpu"
    assert chat_model.chat([{"role": "user", "content": "hi"}]).shape[0] == 1


@pytest.mark.usefixtures("recipe")
@pytest.mark.parametrize("backend", BACKENDS, ids=["qwen2-audio", "qwen2-vl"])
@pytest.mark.parametrize("request_", ["auto", "cpu"])
def test_recipe_loads_and_generates_on_the_cpu(tiny_dirs, backend, request_):
    chat_model = _backend(backend, tiny_dirs, request_)
    with simulated():
        chat_model.load()
    assert chat_model._omnifix_device == ResolvedDevice({"": "cpu"}, torch.device("cpu"))
    assert chat_model._device == "cpu"
    assert not omnifix.find_meta_tensors(chat_model._model)
    new_tokens = chat_model.chat([{"role": "user", "content": "hi"}], {"max_tokens": 2})
    assert new_tokens.shape[0] == 1
    assert 1 <= new_tokens.shape[1] <= 2


@pytest.mark.usefixtures("recipe")
def test_recipe_refuses_a_missing_gpu_as_xinference_callers_expect(tiny_dirs):
    chat_model = _backend(xi.Qwen2AudioChatModel, tiny_dirs, "cuda:1")
    with simulated(cuda=1), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        chat_model.load()
    assert isinstance(caught.value, ValueError)  # what select_device's callers catch
    assert "cuda:1" in str(caught.value)


def test_restoring_brings_the_standin_back_also_after_an_exception(tiny_dirs):
    originals = {
        (owner, name): owner.__dict__.get(name)
        for owner in BACKENDS
        for name in ("decide_device", "load_multimodal_model")
    }
    select_device = xi.select_device
    handles = []

    def failing_request() -> None:
        with patch_xinference(*BACKENDS, modules=[xi]) as handle:
            handles.append(handle)
            assert xi.select_device is not select_device
            assert len(handle.replaced) == 1 + 2 * len(BACKENDS)  # the module once
            raise KeyError

    with pytest.raises(KeyError):
        failing_request()
    (handle,) = handles
    assert xi.select_device is select_device
    assert {key: key[0].__dict__.get(key[1]) for key in originals} == originals
    handle.remove()  # idempotent
    assert xi.select_device is select_device
    with simulated(cuda=2):  # the bugs are back
        with pytest.raises(ValueError, match="cuda:1 is unavailable"):
            xi.select_device("cuda:1")
        chat_model = _backend(xi.Qwen2AudioChatModel, tiny_dirs, "auto")
        chat_model.decide_device()
    assert chat_model._device == "auto"


def test_inherited_methods_become_inherited_again():
    class Child(xi.PytorchQwen2VLModel):
        pass

    with patch_xinference(Child):
        assert "decide_device" in Child.__dict__
    assert "decide_device" not in Child.__dict__
    assert Child.decide_device is xi.PytorchQwen2VLModel.decide_device


@pytest.mark.parametrize(
    ("backends", "modules", "match"),
    [((), [sys], "no select_device"), ((xi.Qwen2AudioChatModel("u", "p"),), [], "not a class")],
)
def test_bad_arguments_are_refused(backends, modules, match):
    with pytest.raises(omnifix.InvalidArgumentError, match=match):
        patch_xinference(*backends, modules=modules)
    assert xi.select_device.__module__ == "xinference_standin"


@pytest.mark.multi_gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs",
)
@pytest.mark.usefixtures("recipe")
@pytest.mark.parametrize("backend", BACKENDS, ids=["qwen2-audio", "qwen2-vl"])
def test_recipe_on_real_gpus(tiny_dirs, backend):
    chat_model = _backend(backend, tiny_dirs, "auto")
    chat_model.load()
    assert chat_model._omnifix_device == ResolvedDevice("auto", None)
    assert chat_model._device == str(omnifix.input_device(chat_model._model))
    assert chat_model._device.startswith("cuda:")
    assert chat_model.chat([{"role": "user", "content": "hi"}]).shape[0] == 1
