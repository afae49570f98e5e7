"""omnifix.integrations.xinference against the real Xinference 4.1.0 backends, on the cpu.

Xinference is installed in the newest test stack only (``ci/stacks/tf5.nodeps.txt``: the package
with ``--no-deps``, plus the few modules its backend modules import, listed in ``tf5.txt``); these
tests skip elsewhere. They drive the real ``Qwen2AudioChatModel``, ``Qwen2VLChatModel`` and
``QwenOmniChatModel`` with the tiny models of ``omnifix.testing``:

- Qwen2-Audio end to end: the real ``load()`` (``decide_device``, ``load_processor`` from a tiny
  tokenizer and feature extractor saved beside the weights, ``load_multimodal_model``), then its own
  input path (``build_inputs_from_messages``) and ``chat``. Its ``_transform_messages`` imports
  librosa, which it calls only for audio items: the text-only messages here run with an empty
  ``librosa`` module in its place (the real one brings numba and scikit-learn).
- Qwen2-VL and Qwen2.5-Omni: ``decide_device`` and ``load_multimodal_model``, the methods the patch
  replaces. Their processors need torchvision's video processor in transformers 5.x, and the
  package index's torchvision for Linux does not load against a CPU build of torch.

GPU machines are simulated by patching torch's availability probes, as tests/test_devices.py does;
weights only ever load on the cpu (this machine's one device), so on a simulated GPU machine the
tests check what the backend decides and passes to ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import copyreg
import importlib
import json
import pickle
import sys
import types
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
    from pathlib import Path

_PICKLING = dict(copyreg.dispatch_table)
xutils = pytest.importorskip(
    "xinference.model.utils",
    reason="Xinference is installed in the newest test stack only (ci/stacks/tf5.nodeps.txt)",
)
_MULTIMODAL = "xinference.model.llm.transformers.multimodal"
AUDIO = importlib.import_module(f"{_MULTIMODAL}.qwen2_audio").Qwen2AudioChatModel
VL = importlib.import_module(f"{_MULTIMODAL}.qwen2_vl").Qwen2VLChatModel
OMNI = importlib.import_module(f"{_MULTIMODAL}.qwen-omni").QwenOmniChatModel  # a hyphenated module
#: How exceptions pickle in an Xinference process: xoscar, which carries them between its actors,
#: registers tblib's pickling for every exception class when it is imported. Kept for the test
#: below, and undone for the rest of the suite, which runs in this process.
XOSCAR_PICKLING = dict(copyreg.dispatch_table)
copyreg.dispatch_table.clear()
copyreg.dispatch_table.update(_PICKLING)
BACKENDS = (AUDIO, VL, OMNI)
FAMILY = {AUDIO: "qwen2-audio", VL: "qwen2-vl", OMNI: "qwen2.5-omni"}
#: What each backend's family declares (Xinference picks the class from it; Omni its version).
ARCHITECTURE = {
    AUDIO: "Qwen2AudioForConditionalGeneration",
    VL: "Qwen2VLForConditionalGeneration",
    OMNI: "Qwen2_5OmniModel",
}
IDS = ["qwen2-audio", "qwen2-vl", "qwen2.5-omni"]
HI = [{"role": "user", "content": "hi"}]


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


def _save_audio_processor(path: Path) -> None:
    """A tiny Qwen2-Audio tokenizer and feature extractor, ids as omnifix.testing's config."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    special = {  # the ids the tiny config uses, the names the real tokenizer gives them
        text["bos_token_id"]: "<|endoftext|>",
        text["bos_token_id"] + 1: "<|im_start|>",
        text["eos_token_id"]: "<|im_end|>",
        config["audio_token_index"] - 2: "<|audio_bos|>",
        config["audio_token_index"] - 1: "<|audio_eos|>",
        config["audio_token_index"]: "<|AUDIO|>",
    }
    vocab = {chr(code): code - 32 for code in range(32, 127)}  # one token per character
    vocab["\n"], vocab["<unk>"] = len(vocab), len(vocab) + 1
    vocab.update({token: token_id for token_id, token in special.items()})
    taken = set(vocab.values())  # the rest of the model's vocabulary, as plain words
    vocab.update({f"w{i}": i for i in range(config["text_config"]["vocab_size"]) if i not in taken})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # noqa: S106 - not a secret
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(special.values()))
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
        "{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    names = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=names["bos_token"], chat_template=template, **names
    )
    mel_bins = config["audio_config"]["num_mel_bins"]
    features = WhisperFeatureExtractor(feature_size=mel_bins)
    Qwen2AudioProcessor(features, fast, chat_template=template).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[type[Any], Path]:
    dirs = {
        backend: ot.save_tiny_model(family, tmp_path_factory.mktemp(family))
        for backend, family in FAMILY.items()
    }
    _save_audio_processor(dirs[AUDIO])
    return dirs


def _backend(backend: type[Any], tiny_dirs: dict[type[Any], Path], device: str) -> Any:
    """The backend as Xinference's worker builds it: uid, family, model path, config."""
    from xinference.model.llm.llm_family import LLMFamilyV2, PytorchLLMSpecV2

    family = FAMILY[backend]
    spec = PytorchLLMSpecV2(
        model_format="pytorch", model_size_in_billions=1, quantization="none", model_id=family
    )
    llm_family = LLMFamilyV2(
        version=2,
        model_name=f"tiny-{family}",
        model_lang=["en"],
        model_ability=["chat", "audio" if backend is AUDIO else "vision"],
        model_specs=[spec],
        architectures=[ARCHITECTURE[backend]],
    )
    return backend(f"tiny-{family}", llm_family, str(tiny_dirs[backend]), {"device": device})


@contextlib.contextmanager
def recorded_device_map(backend: type[Any]) -> Iterator[list[object]]:
    """Record the ``device_map`` the backend passes; load the weights on the cpu."""
    model_class = ot.model_class(FAMILY[backend])
    real = model_class.from_pretrained
    seen: list[object] = []

    def from_pretrained(path: str, **kwargs: Any) -> Any:
        seen.append(kwargs.pop("device_map"))
        return real(path, **kwargs)

    with mock.patch.object(model_class, "from_pretrained", from_pretrained):
        yield seen


@pytest.fixture
def recipe() -> Iterator[None]:
    with patch_xinference(*BACKENDS, modules=[xutils]):
        yield


@pytest.fixture
def no_librosa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen2-Audio imports librosa for every message, and uses it only for audio items."""
    if importlib.util.find_spec("librosa") is None:
        monkeypatch.setitem(sys.modules, "librosa", types.ModuleType("librosa"))


# ------------------------------------------------------------------------------------------------
# Xinference 4.1.0 as it is
# ------------------------------------------------------------------------------------------------


def test_4_1_0_still_rejects_an_indexed_gpu():
    with simulated(cuda=2), pytest.raises(ValueError, match="cuda:1 is unavailable"):
        xutils.select_device("cuda:1")


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_4_1_0_splits_with_inputs_on_bare_cuda_and_no_memory_limits(tiny_dirs, backend):
    """Fixed upstream since 1.6.1: ``"auto"`` is no longer stored as the device. Not fixed: a
    split passes ``device_map="auto"`` with no ``max_memory`` (accelerate may offload silently)
    and inputs go to bare ``"cuda"``, whichever GPU holds the embedding."""
    chat_model = _backend(backend, tiny_dirs, "auto")
    with simulated(cuda=2):
        chat_model.decide_device()
        assert chat_model._device == "cuda"
        with recorded_device_map(backend) as seen:
            chat_model.load_multimodal_model()
    assert seen == ["auto"]
    assert chat_model._device == "cuda"  # where build_inputs_from_messages moves every input


# ------------------------------------------------------------------------------------------------
# With omnifix's patch
# ------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("recipe")
@pytest.mark.parametrize(
    ("machine", "request_", "name"),
    [
        ({"cuda": 2}, "auto", "cuda"),  # several GPUs: "cuda", which the backends spread
        ({"cuda": 2}, "cuda:1", "cuda:1"),
        ({"cuda": 1}, "auto", "cuda:0"),
        ({"cuda": 1, "rocm": True}, "auto", "cuda:0"),
        ({"cuda": 2, "rocm": True}, "rocm", "cuda"),
        ({"cuda": 2, "rocm": True}, "hip:1", "cuda:1"),
        ({}, "auto", "cpu"),
    ],
)
def test_select_device_returns_names_torch_accepts(machine, request_, name):
    modules = [xutils, *(sys.modules[backend.__module__] for backend in BACKENDS)]
    with simulated(**machine):
        for module in modules:  # each backend module imported select_device by name
            assert module.select_device(request_) == name
        assert torch.device(name).type == ("cuda" if machine else "cpu")


@pytest.mark.usefixtures("recipe")
@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize(
    ("machine", "request_", "expected"),
    [
        ({"cuda": 2}, "auto", ({"auto"}, ResolvedDevice("auto", None))),
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
def test_on_gpu_machines_the_map_is_planned_and_inputs_follow_the_model(
    tiny_dirs, backend, machine, request_, expected
):
    passed, resolved = expected
    chat_model = _backend(backend, tiny_dirs, request_)
    with simulated(**machine):
        chat_model.decide_device()
        assert chat_model._omnifix_device == resolved
        assert chat_model._device != "auto"
        with recorded_device_map(backend) as seen:
            chat_model.load_multimodal_model()  # inside patch_from_pretrained: planned, checked
        assert seen[0] in passed
        assert omnifix.resolve_device_map(seen[0]) == resolved
    # The weights loaded on the cpu; inputs go to the input embedding's device, not "cuda".
    assert chat_model._device == str(omnifix.input_device(chat_model._model)) == "cpu"
    assert not omnifix.find_meta_tensors(chat_model._model)


@pytest.mark.usefixtures("recipe", "no_librosa")
@pytest.mark.parametrize("request_", ["auto", "cpu"])
def test_qwen2_audio_loads_takes_inputs_and_chats_on_the_cpu(tiny_dirs, request_):
    chat_model = _backend(AUDIO, tiny_dirs, request_)
    with simulated():
        chat_model.load()  # decide_device, load_processor, load_multimodal_model
    assert chat_model._omnifix_device == ResolvedDevice({"": "cpu"}, torch.device("cpu"))
    assert chat_model._device == "cpu"
    assert not omnifix.find_meta_tensors(chat_model._model)
    inputs = chat_model.build_inputs_from_messages(HI, {})
    assert {tensor.device.type for tensor in inputs.data.values()} == {"cpu"}
    completion = chat_model.chat(HI, {"max_tokens": inputs.input_ids.shape[-1] + 2})
    assert completion["usage"]["completion_tokens"] >= 1


def test_omnifix_errors_cross_xinference_actors():
    """An error raised in a model actor reaches the caller through xoscar's exception pickling."""
    plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "8GiB"})
    errors = [omnifix.InsufficientMemoryError(plan.explain(), plan=plan)]
    with pytest.raises(omnifix.DeviceUnavailableError) as missing:
        omnifix.normalize_device("cuda:3")
    errors.append(missing.value)
    assert len(XOSCAR_PICKLING) > len(_PICKLING)  # xoscar registered its pickling
    with mock.patch.dict(copyreg.dispatch_table, XOSCAR_PICKLING):
        copies = [pickle.loads(pickle.dumps(error)) for error in errors]  # noqa: S301 - ours
    for error, copy in zip(errors, copies, strict=True):
        assert type(copy) is type(error)
        assert str(copy) == str(error)
    assert copies[0].plan.to_dict() == plan.to_dict()
    assert copies[1].requested == "cuda:3"


@pytest.mark.usefixtures("recipe")
def test_a_missing_gpu_is_refused_as_xinference_callers_expect(tiny_dirs):
    chat_model = _backend(AUDIO, tiny_dirs, "cuda:1")
    with simulated(cuda=1), pytest.raises(omnifix.DeviceUnavailableError) as caught:
        chat_model.decide_device()
    assert isinstance(caught.value, ValueError)  # what select_device's callers catch
    assert "cuda:1" in str(caught.value)


def test_restoring_brings_4_1_0_back_also_after_an_exception(tiny_dirs):
    originals = {
        (owner, name): owner.__dict__.get(name)
        for owner in BACKENDS
        for name in ("decide_device", "load_multimodal_model")
    }
    modules = [xutils, *(sys.modules[backend.__module__] for backend in BACKENDS)]
    select_devices = [module.select_device for module in modules]
    handles = []

    def failing_request() -> None:
        with patch_xinference(*BACKENDS, modules=[xutils]) as handle:
            handles.append(handle)
            assert [module.select_device for module in modules] != select_devices
            assert len(handle.replaced) == len(modules) + 2 * len(BACKENDS)
            raise KeyError

    with pytest.raises(KeyError):
        failing_request()
    (handle,) = handles
    assert [module.select_device for module in modules] == select_devices
    assert {key: key[0].__dict__.get(key[1]) for key in originals} == originals
    handle.remove()  # idempotent
    with simulated(cuda=2), pytest.raises(ValueError, match="cuda:1 is unavailable"):
        xutils.select_device("cuda:1")  # the upstream behaviour is back


def test_inherited_methods_become_inherited_again():
    class Child(VL):
        pass

    with patch_xinference(Child):
        assert "decide_device" in Child.__dict__
    assert "decide_device" not in Child.__dict__
    assert Child.decide_device is VL.decide_device


@pytest.mark.parametrize(
    ("backends", "modules", "match"),
    [((), [json], "no select_device"), (("Qwen2VLChatModel",), [], "not a class")],
)
def test_bad_arguments_are_refused(backends, modules, match):
    select_device = xutils.select_device
    with pytest.raises(omnifix.InvalidArgumentError, match=match):
        patch_xinference(*backends, modules=modules)
    assert xutils.select_device is select_device


@pytest.mark.multi_gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs",
)
@pytest.mark.usefixtures("recipe", "no_librosa")
def test_on_real_gpus(tiny_dirs):
    chat_model = _backend(AUDIO, tiny_dirs, "auto")
    chat_model.load()
    assert chat_model._omnifix_device == ResolvedDevice("auto", None)
    assert chat_model._device == str(omnifix.input_device(chat_model._model))
    assert chat_model._device.startswith("cuda:")
    completion = chat_model.chat(HI, {"max_tokens": 64})
    assert completion["usage"]["completion_tokens"] >= 1
