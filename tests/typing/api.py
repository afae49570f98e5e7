"""Type-checked by ``mypy --strict`` in CI, never run: the public API reads as users will write it.

If a signature changes in a way that breaks these lines, users' type-checked code breaks too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import omnifix
import omnifix.types

if TYPE_CHECKING:
    import torch
    from torch import nn


def devices() -> None:
    a: torch.device = omnifix.normalize_device()
    b: torch.device = omnifix.normalize_device("cuda:1")
    c: torch.device = omnifix.normalize_device(0)
    d: torch.device = omnifix.normalize_device(None)
    e: torch.device = omnifix.normalize_device(a)
    resolved: omnifix.types.ResolvedDevice = omnifix.resolve_device_map("cuda")
    device_map, input_device = resolved
    explicit = omnifix.resolve_device_map({"model": 0, "lm_head": "cpu"})
    maybe: torch.device | None = explicit.input_device
    request: omnifix.types.DeviceRequest = "balanced"
    value: omnifix.types.DeviceMapValue = omnifix.resolve_device_map(request).device_map
    del b, c, d, e, device_map, input_device, maybe, value


def models(model: nn.Module) -> None:
    where: torch.device = omnifix.input_device(model)
    report: omnifix.MetaReport = omnifix.find_meta_tensors(model)
    names: list[str] = [tensor.name for tensor in report.tensors]
    total: int = report.total_bytes
    omnifix.assert_no_meta(model)
    omnifix.assert_no_meta(model, allow_offload=True)
    pin: omnifix.types.EmbeddingPin = omnifix.pin_embeddings(model)
    pinned: tuple[str, ...] = pin.modules
    pin.remove()
    with omnifix.pin_embeddings(model, device="cuda:0") as again:
        assert again.active
    lean: omnifix.types.LeanDispatch = omnifix.lean_dispatch(model)
    hooks: int = lean.hooks
    devices: tuple[str, ...] = lean.devices
    lean.remove()
    with omnifix.lean_dispatch(model, device_map={"model.layers.0": 0, "lm_head": "cuda:1"}):
        pass
    handles: list[omnifix.types.Handle] = [pin, lean, omnifix.patch_from_pretrained(strict=True)]
    for handle in handles:
        handle.remove()
    with omnifix.patch_from_pretrained(workload=omnifix.Workload(text_tokens=64)) as patch:
        active: bool = patch.active
    del where, names, total, pinned, hooks, devices, active


def errors() -> None:
    try:
        omnifix.normalize_device("cdua")
    except omnifix.DeviceUnavailableError as unavailable:
        device_error: omnifix.DeviceError = unavailable
        value_error: ValueError = unavailable
        available: tuple[str, ...] = unavailable.available
        del device_error, value_error, available
    except omnifix.OmnifixError:
        pass
    memory = omnifix.InsufficientMemoryError("x")
    refused: omnifix.PlacementPlan | None = memory.plan
    runtime = omnifix.MetaTensorError("x")
    report: omnifix.MetaReport | None = runtime.report
    as_builtins: tuple[MemoryError, RuntimeError] = (memory, runtime)
    del refused, report, as_builtins


def testing(tmp: str) -> None:
    import omnifix.testing

    family: omnifix.testing.Family = "qwen2-vl"
    path = omnifix.testing.save_tiny_model(family, tmp, seed=1)
    model = omnifix.testing.model_class(family).from_pretrained(path)
    inputs: dict[str, torch.Tensor] = omnifix.testing.tiny_inputs(family, model.config)
    del inputs


def planning_and_loading(path: str) -> None:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    work = omnifix.Workload(text_tokens=2048, image_tokens=1280, max_new_tokens=64)
    plan: omnifix.PlacementPlan = omnifix.plan_placement(
        "qwen2.5-vl-7b", budgets={0: "24GiB", 1: "24GiB"}, workload=work
    )
    fits: bool = plan.fits
    device_map: dict[str, str] = plan.device_map
    inputs_on: torch.device | None = plan.input_device
    unlimited: bool = plan.devices[0].unlimited
    rows: tuple[omnifix.types.DeviceBudget, ...] = plan.devices
    peak: int = rows[0].total
    explicit = omnifix.plan_placement(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = omnifix.load_safely(path, model_class=Qwen2VLForConditionalGeneration, workload=work)
    typed: Qwen2VLForConditionalGeneration = model
    report: omnifix.PlacementReport = omnifix.placement_report(typed)
    hooks: str = report.hooks
    kept = omnifix.load_safely(path, hooks="accelerate")
    del fits, device_map, inputs_on, unlimited, peak, explicit, report, hooks, kept
