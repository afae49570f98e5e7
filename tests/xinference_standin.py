"""A stand-in for the parts of Xinference that pick devices for its transformers backends.

Xinference cannot be installed here, so this ONE file re-implements, from the published source of
``xorbitsai/inference``, exactly the functions omnifix's recipe patches and the calls around them.
It is not Xinference; names and behaviour mirror these upstream functions:

* ``xinference/device_utils.py``: ``DeviceSpec``, ``DEVICE_REGISTRY`` (ordered; the ROCm entry
  comes before CUDA because ``torch.cuda.is_available()`` is also true on ROCm, and it has no
  ``pytorch_device_name``), ``get_available_device()`` (first available entry's
  ``pytorch_device_name or name``, so ``"rocm"`` on ROCm; ``"cpu"`` when none) and
  ``is_device_available(device)`` (``"cpu"``, or a registry *name* that is available, so
  ``"cuda:1"`` is never available). Only the metax/rocm/cuda/mps/xpu entries are reproduced; the
  others (npu, mlu, vacc, musa, gcu) need vendor packages.
* ``xinference/model/utils.py`` ``select_device(device)``: ``"auto"`` returns
  ``get_available_device()``; anything else must pass ``is_device_available`` or raises
  ``ValueError(f"{device} is unavailable in your environment")``.
* ``xinference/model/llm/transformers/multimodal/core.py`` ``PytorchMultiModalModel``: ``load()``
  calls ``decide_device()``, ``load_processor()``, ``load_multimodal_model()`` (the reasoning and
  tool-call set-up between them is left out); ``chat()`` builds inputs with
  ``build_inputs_from_messages`` and calls ``self._model.generate``.
* ``multimodal/qwen2_audio.py`` ``Qwen2AudioChatModel`` in the variant that stores the
  ``device_map`` word ``"auto"`` as the device (``"auto" if device == "cuda" else device``) and
  later moves the inputs with ``.to(self._device)``. That failure is reported for Xinference
  v1.2.2 in xorbitsai/inference issue 2902 (``Expected one of cpu, cuda, ... device type at start
  of device string: auto``); the exact upstream lines of that release and the last release that
  had them (omnifix's docs say v1.6.0) were NOT verified here. The current upstream file and the
  pre-refactor ``load()`` store ``select_device``'s answer in ``self._device`` and write
  ``device_map="auto" if self._device == "cuda" else self._device`` instead; the Qwen2-VL
  stand-in below follows that form.
* ``multimodal/qwen2_vl.py`` ``PytorchQwen2VLModel``: ``decide_device`` stores
  ``select_device(...)``, ``load_multimodal_model`` passes ``"auto"`` for ``"cuda"``, inputs go
  ``.to(self._device)``.

The real backends run a processor on chat messages; the tiny models of ``omnifix.testing`` have
no tokenizer, so here ``build_inputs_from_messages`` ignores the messages' text and builds
matching tensors with ``omnifix.testing.tiny_inputs``. Like upstream, ``qwen2_audio`` and
``qwen2_vl`` use the ``select_device`` name bound in their own module (upstream: ``from
.....model.utils import select_device``), which is this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import omnifix.testing as ot

if TYPE_CHECKING:
    import os

# --- xinference/device_utils.py -----------------------------------------------------------------


@dataclass
class DeviceSpec:
    name: str
    is_available: Any
    pytorch_device_name: str | None = None


def is_metax_available() -> bool:
    return False  # needs pymxsml, a vendor package


def is_rocm_available() -> bool:
    return torch.cuda.is_available() and torch.version.hip is not None


def is_cuda_available() -> bool:
    return torch.cuda.is_available()


def is_mps_available() -> bool:
    return torch.backends.mps.is_available()


def is_xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


DEVICE_REGISTRY = [
    # metax and rocm must come before cuda: their is_cuda_available() also returns True
    DeviceSpec("metax", is_metax_available, pytorch_device_name="cuda"),
    DeviceSpec("rocm", is_rocm_available),
    DeviceSpec("cuda", is_cuda_available),
    DeviceSpec("mps", is_mps_available),
    DeviceSpec("xpu", is_xpu_available),
]


def get_available_device() -> str:
    for spec in DEVICE_REGISTRY:
        if spec.is_available():
            return spec.pytorch_device_name or spec.name
    return "cpu"


def is_device_available(device: str) -> bool:
    if device == "cpu":
        return True
    return any(spec.name == device and spec.is_available() for spec in DEVICE_REGISTRY)


# --- xinference/model/utils.py ------------------------------------------------------------------


def select_device(device: str) -> str:
    if device == "auto":
        return get_available_device()
    if not is_device_available(device):
        msg = f"{device} is unavailable in your environment"
        raise ValueError(msg)
    return device


# --- xinference/model/llm/transformers/multimodal/core.py ----------------------------------------


class PytorchMultiModalModel:
    family: ot.Family  # stand-in only: which tiny inputs to build

    def __init__(self, model_uid: str, model_path: str | os.PathLike[str], **config: Any) -> None:
        self.model_uid = model_uid
        self.model_path = model_path
        self._pytorch_model_config: dict[str, Any] = dict(config)
        self._tokenizer: Any = None
        self._device: Any = None
        self._processor: Any = None
        self._model: Any = None

    def decide_device(self) -> None:
        raise NotImplementedError

    def load_processor(self) -> None:
        raise NotImplementedError

    def load_multimodal_model(self) -> None:
        raise NotImplementedError

    def load(self) -> None:
        self.decide_device()
        self.load_processor()
        self.load_multimodal_model()

    def build_inputs_from_messages(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def chat(
        self, messages: list[dict[str, Any]], generate_config: dict[str, Any] | None = None
    ) -> torch.Tensor:
        inputs = self.build_inputs_from_messages(messages)
        max_tokens = (generate_config or {}).get("max_tokens", 2)
        output = self._model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return output[:, inputs["input_ids"].shape[1] :]

    def _processor_output(self) -> dict[str, torch.Tensor]:
        """Stand-in for ``self._processor(text=..., ..., return_tensors="pt")``: cpu tensors."""
        return ot.tiny_inputs(self.family, self._model.config)


# --- multimodal/qwen2_audio.py (the variant that stores "auto") -----------------------------------


class Qwen2AudioChatModel(PytorchMultiModalModel):
    family = "qwen2-audio"

    def decide_device(self) -> None:
        device = self._pytorch_model_config.get("device", "auto")
        device = select_device(device)
        # for multiple GPU, set back to auto to make multiple devices work
        self._device = "auto" if device == "cuda" else device

    def load_processor(self) -> None:
        pass  # the tiny checkpoint has no processor files

    def load_multimodal_model(self) -> None:
        from transformers import Qwen2AudioForConditionalGeneration

        self._model = Qwen2AudioForConditionalGeneration.from_pretrained(
            self.model_path, device_map=self._device
        )

    def build_inputs_from_messages(
        self,
        messages: list[dict[str, Any]],  # noqa: ARG002 - the tiny models have no processor
    ) -> dict[str, Any]:
        inputs = self._processor_output()
        # Make sure that the inputs and the model are on the same device.
        return {key: value.to(self._device) for key, value in inputs.items()}


# --- multimodal/qwen2_vl.py --------------------------------------------------------------------


class PytorchQwen2VLModel(PytorchMultiModalModel):
    family = "qwen2-vl"

    def decide_device(self) -> None:
        device = self._pytorch_model_config.get("device", "auto")
        self._device = select_device(device)

    def load_processor(self) -> None:
        pass

    def load_multimodal_model(self) -> None:
        from transformers import Qwen2VLForConditionalGeneration

        self._model = Qwen2VLForConditionalGeneration.from_pretrained(
            self.model_path, device_map="auto" if self._device == "cuda" else self._device
        ).eval()

    def build_inputs_from_messages(
        self,
        messages: list[dict[str, Any]],  # noqa: ARG002 - the tiny models have no processor
    ) -> dict[str, Any]:
        return {key: value.to(self._device) for key, value in self._processor_output().items()}
