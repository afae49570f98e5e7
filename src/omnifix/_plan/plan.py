"""The planner's entry point and answer: :func:`plan_placement` and :class:`PlacementPlan`."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal, cast, get_args

from omnifix._attention import IMPLEMENTATIONS, choose_attention, choose_dtype
from omnifix._device_map import Placement
from omnifix._plan.budgets import SIMULATED_CAPABILITY, DeviceBudget, resolve_budgets
from omnifix._plan.code import call_of
from omnifix._plan.estimate import CALIBRATION
from omnifix._plan.options import PlanOption, bound_option, options
from omnifix._plan.parallel import ParallelLayout, ParallelRequest, plan_parallel
from omnifix._plan.presets import preset_repo
from omnifix._plan.quantization import (
    Quantization,
    quantize,
    resolve_quantization,
    stored_quantization,
)
from omnifix._plan.skeleton import load_skeleton
from omnifix._plan.strategies import Request, Strategy, choose
from omnifix._plan.workload import Workload, require_workload
from omnifix._stored import stored_weights
from omnifix._table import Block, Table, plain, rich
from omnifix._units import format_bytes
from omnifix.errors import InsufficientMemoryError, InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import torch
    from rich.console import Group

    from omnifix._attention import Capability
    from omnifix._plan.engines import Engine
    from omnifix._plan.skeleton import Skeleton
    from omnifix._stored import StoredWeights

__all__ = ["AttnImplementation", "PlacementPlan", "plan_placement"]

#: Attention implementations the planner models (flash and flex attention materialise no
#: scores, like sdpa).
AttnImplementation = Literal[
    "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"
]


@dataclass(frozen=True, kw_only=True)
class PlacementPlan:
    """The planner's answer (see :func:`omnifix.plan_placement`).

    Attributes:
        model: What was planned (preset name, directory name or class name).
        strategy: ``"single"``, ``"split"``, ``"offload"``, ``"parallel"`` or ``"refuse"``.
        reason: Why this strategy, in one sentence with the numbers.
        device_map: For ``from_pretrained(device_map=...)``: ``"cuda:N"``, ``"cpu"``, ``"disk"``
            (as :func:`omnifix.resolve_device_map` spells them); for a refusal, the closest try.
            For a parallel plan: the pipeline stage (``"stage N"``) of each module, not a map
            for ``from_pretrained``.
        devices: Predicted use of every budgeted GPU, and of ``cpu``/``disk`` where mapped;
            for a parallel plan, one GPU of each pipeline stage (``"stage N"``).
        dtype: Dtype the numbers assume (pass it to ``from_pretrained``).
        attn_implementation: Attention the numbers assume.
        workload: The workload planned for.
        options: For a refusal: each change that fits, checked by planning again with exactly
            that change (:class:`omnifix.types.PlanOption`: the call that checks it, the
            keywords that load with it, the plan it gives).
        input_device: Where ``input_ids`` go: where the input embeddings run (``None``: refused).
        notes: Assumptions behind the numbers.
        quantization: The bitsandbytes quantisation the numbers assume (``None``: unquantised);
            :attr:`quantization_config` is its ``BitsAndBytesConfig``.
        parallel: For a parallel plan (``engine=``, ``nodes=``, ...): the layout, why, and the
            engine's command lines (``plan.parallel.launch``); else ``None``.
    """

    model: str
    strategy: Strategy
    reason: str
    device_map: dict[str, str]
    devices: tuple[DeviceBudget, ...]
    dtype: torch.dtype
    attn_implementation: AttnImplementation
    workload: Workload
    options: tuple[PlanOption, ...] = field(default=())
    input_device: torch.device | None = None
    notes: tuple[str, ...] = field(default=())
    quantization: Quantization | None = None
    parallel: ParallelLayout | None = None

    @property
    def quantization_config(self) -> Any:
        """The ``transformers.BitsAndBytesConfig`` the numbers assume (``None``: unquantised).

        Pass it to ``from_pretrained`` as ``quantization_config=``; ``load_safely`` does.

        Raises:
            QuantizationUnavailableError: transformers 4.x builds a 4-bit config only with
                bitsandbytes installed.
        """
        return None if self.quantization is None else self.quantization.config(self.dtype)

    @property
    def fits(self) -> bool:
        """Whether every device's predicted peak is within its budget."""
        return self.strategy != "refuse" and all(device.fits for device in self.devices)

    @property
    def devices_used(self) -> tuple[str, ...]:
        """Devices that hold weights, in map order."""
        return tuple(dict.fromkeys(self.device_map.values()))

    @property
    def boundaries(self) -> int:
        """How often consecutive modules of the map change device (tensors cross devices)."""
        pairs = itertools.pairwise(self.device_map.values())
        return sum(1 for before, after in pairs if before != after)

    def device(self, name: str) -> DeviceBudget:
        """The row of ``name`` (``"cuda:0"``, ``"cpu"``)."""
        found = next((row for row in self.devices if row.device == name), None)
        if found is not None:
            return found
        known = ", ".join(row.device for row in self.devices)
        raise InvalidArgumentError(f"The plan has no device {name!r}. Ask for one of {known}.")

    def explain(self) -> str:
        """Why the plan fits; or what does not fit, by how much where, and what would fit.

        For a refusal, the message of the :class:`omnifix.InsufficientMemoryError` that
        :meth:`raise_if_refused` raises; it ends with the fix.
        """
        head = (
            f"{self.model} ({_dtype_name(self.dtype)}, {self.attn_implementation}, {self.workload})"
        )
        if self.fits:
            return f"{head} fits: {self.reason}."
        lines = [f"{head} does not fit the memory it may use: {self.reason}."]
        lines += [f"  {_need_line(row)}" for row in self.devices if row.weights or not row.fits]
        return "\n".join([*lines, *self._options()])

    def raise_if_refused(self) -> PlacementPlan:
        """Return the plan if it fits, else raise :class:`omnifix.InsufficientMemoryError`.

        Raises:
            InsufficientMemoryError: With :meth:`explain` as the message and the plan as
                ``error.plan``.
        """
        if not self.fits:
            raise InsufficientMemoryError(self.explain(), plan=self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (bytes as ints, the dtype as its name)."""
        return {
            "model": self.model,
            "strategy": self.strategy,
            "fits": self.fits,
            "reason": self.reason,
            "dtype": _dtype_name(self.dtype),
            "attn_implementation": self.attn_implementation,
            "workload": asdict(self.workload),
            "device_map": dict(self.device_map),
            "input_device": None if self.input_device is None else str(self.input_device),
            "devices": [
                {**asdict(row), "total": row.total, "fits": row.fits} for row in self.devices
            ],
            "quantization_config": (
                None if self.quantization is None else self.quantization.arguments(self.dtype)
            ),
            "options": [option.to_dict() for option in self.options],
            "notes": list(self.notes),
            "parallel": None if self.parallel is None else self.parallel.to_dict(),
        }

    def _options(self) -> list[str]:
        """A refusal's options, each checked by planning again, and the fix."""
        if self.fits:
            return []
        if not self.options:
            gpus = any(row.device.startswith("cuda") for row in self.devices)
            return [
                _NO_LAYOUT_FITS if self.parallel else _NOTHING_FITS if gpus else _NOTHING_FITS_CPU
            ]
        options = [f"  - {option}".replace("\n", "\n  ") for option in self.options]
        return [
            "Options that fit (each checked by planning again with exactly that change):",
            *options,
            _APPLY_ONE,
        ]

    def _blocks(self, *, launch: bool = True) -> list[Block]:
        """What :meth:`__str__` and :meth:`__rich__` show, top to bottom."""
        cells: dict[str, Callable[[DeviceBudget], str]] = {
            "budget": lambda row: "unlimited" if row.unlimited else format_bytes(row.budget),
            "weights": lambda row: format_bytes(row.weights),
            "KV cache": lambda row: format_bytes(row.kv_cache),
            "activations": lambda row: (
                format_bytes(row.activations) + (f" ({row.phase})" if row.phase else "")
            ),
            "allocator": lambda row: format_bytes(row.allocator),
            "overhead": lambda row: format_bytes(row.overhead),
            "total": lambda row: format_bytes(row.total),
            "margin": lambda row: format_bytes(row.margin),
            "fits": lambda row: "yes" if row.fits else f"NO ({format_bytes(-row.headroom)} short)",
        }
        devices = tuple(row.device for row in self.devices)
        verdict = "fits" if self.fits else "does not fit"
        return [
            (
                f"PlacementPlan for {self.model}: {self.strategy} "
                f"({_dtype_name(self.dtype)}, {self.attn_implementation}) - {verdict}"
            ),
            f"workload: {self.workload}",
            *([f"layout: {self.parallel}"] if self.parallel else []),
            f"why: {self.reason}",
            Table(
                ("", *devices),
                tuple((name, *map(cell, self.devices)) for name, cell in cells.items()),
                title="memory per device",
                style=_verdict_style,
                fold=frozenset(devices),
            ),
            Table(
                ("device", "modules"),
                tuple(_map_summary(self.device_map)),
                title="pipeline stages" if self.parallel else "device_map",
                fold=frozenset({"modules"}),
            ),
            *self._options(),
            *(_launch_lines(self.parallel) if launch else []),
        ]

    def __str__(self) -> str:
        """The strategy and why, a table of the devices, the map as layer ranges, the options."""
        return plain(self._blocks())

    def __rich__(self) -> Group:
        """The same as :meth:`__str__`, as rich tables (``rich.print(plan)``, ``omnifix plan``).

        Without a parallel plan's command lines, which a terminal would wrap: print
        ``plan.parallel.launch.text`` for those.
        """
        return rich(self._blocks(launch=False))


def _launch_lines(layout: ParallelLayout | None) -> list[Block]:
    """The engine's command lines of a parallel plan that fits."""
    if layout is None or layout.launch is None:
        return []
    return [f"launch with {layout.engine}:", layout.launch.text]


def _verdict_style(_device: str, text: str) -> str:  # green: fits, red: does not; else plain
    return "green" if text == "yes" else "red" if text.startswith("NO (") else ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _need_line(row: DeviceBudget) -> str:
    parts = (
        f"weights {format_bytes(row.weights)} + KV cache {format_bytes(row.kv_cache)} + "
        f"activations {format_bytes(row.activations)} + allocator {format_bytes(row.allocator)} + "
        f"overhead {format_bytes(row.overhead)}"
    )
    verdict = "fits" if row.fits else f"{format_bytes(-row.headroom)} short"
    budget = "unlimited" if row.unlimited else format_bytes(row.budget)
    return (
        f"{row.device}: needs {format_bytes(row.total + row.margin)} ({parts}, plus a "
        f"{format_bytes(row.margin)} margin), has {budget}: {verdict}"
    )


_APPLY_ONE: Final = (
    "Fix: apply one of these options (the first is the least invasive), or free memory on the GPUs."
)
_NOTHING_FITS: Final = (
    "Fix: use GPUs with more free memory or more GPUs; nothing that omnifix can change (dtype, "
    "attention, workload, quantisation, offload, cpu) fits here."
)
_NOTHING_FITS_CPU: Final = (
    "Fix: give the cpu more memory, or plan for GPUs (budgets={0: '24GiB'}); nothing that "
    "omnifix can change (dtype, attention, workload, offload to disk) fits here."
)
_NO_LAYOUT_FITS: Final = (
    "Fix: use GPUs with more memory, or more hosts (nodes=); no tensor x pipeline layout of these "
    "GPUs, nor up to 8 times as many hosts or fewer text tokens, fits."
)
_NUMBERED: Final = re.compile(r"^(?P<stem>.*\.)(?P<index>\d+)$")


def _map_summary(device_map: Mapping[str, str]) -> list[tuple[str, str]]:
    """Consecutive entries per device, numbered layers folded into ranges (``layers.0-13``)."""
    summary = []
    for device, entries in itertools.groupby(device_map, key=device_map.__getitem__):
        runs: list[tuple[str, int, int]] = []  # (stem, first, last); (name, -1, -1) unnumbered
        for name in entries:
            match = _NUMBERED.match(name)
            index = int(match["index"]) if match else -1
            if match and runs and runs[-1][0] == match["stem"] and runs[-1][2] + 1 == index:
                runs[-1] = (runs[-1][0], runs[-1][1], index)
            else:
                runs.append((match["stem"], index, index) if match else (name, -1, -1))
        names = (
            (stem or "(whole model)")
            if first < 0
            else f"{stem}{first}" + (f"-{last}" if last > first else "")
            for stem, first, last in runs
        )
        summary.append((device, ", ".join(names)))
    return summary


def _planned_attention(
    requested: str, dtype: torch.dtype, capabilities: list[Capability], model_class: type
) -> AttnImplementation:
    import torch

    if requested == "auto":
        chosen = choose_attention(
            "auto", dtype=dtype, capabilities=capabilities, model_class=model_class
        )
    else:  # validation only: a plan may assume a backend this machine lacks (it plans for another)
        every = frozenset(IMPLEMENTATIONS)
        chosen = choose_attention(
            requested, dtype=torch.bfloat16, capabilities=[(9, 0)], installed=every
        )
    if chosen not in get_args(AttnImplementation):
        return "sdpa"  # hub kernels and paged variants: modelled like sdpa
    attn: AttnImplementation = chosen  # type: ignore[assignment]
    return attn


def _check_workload(skeleton: Skeleton, workload: Workload) -> None:
    kinds = {tower.kind for tower in skeleton.anatomy.towers}
    wanted = {
        "vision": workload.image_tokens or workload.video_seconds,
        "audio": workload.audio_seconds,
    }
    for kind, amount in wanted.items():
        if amount and kind not in kinds:
            field_names = "image_tokens/video_seconds" if kind == "vision" else "audio_seconds"
            raise InvalidArgumentError(
                f"The workload has {kind} input but {skeleton.label} has no {kind} tower. Set "
                f"{field_names} to 0 for this model."
            )


def _unknown(request: Request) -> tuple[str, ...]:
    """What the memory model does not understand about the model, with the bound it uses."""
    anatomy = request.skeleton.anatomy
    unknown = (*anatomy.unknown, *request.unsized)
    if anatomy.decoders or anatomy.towers:
        return unknown
    return (
        *unknown,
        (
            "no language model or tower recognised (no stack of layers with a vocabulary, "
            "patches or mel bins): the bound counts weights, overhead and margin only"
        ),
    )


def _unsized(method: str | None, stored: object, weights: StoredWeights | None) -> tuple[str, ...]:
    """The checkpoint's quantised weights the memory model does not size, with the bound used."""
    bound = "the bound counts them unquantised, in the plan's dtype"
    if method:
        return (f"the checkpoint is quantised with {method}, which omnifix does not size: {bound}",)
    if stored is None and weights is not None and weights.packed:
        packed = ", ".join(f"{count:,} in {dtype}" for dtype, count in weights.packed)
        packed_note = (
            f"the checkpoint stores weights packed ({packed}) as quantised weights are, but its "
            f"config.json has no quantization_config: {bound}"
        )
        return (packed_note,)
    return ()


def _stored_notes(weights: StoredWeights | None, dtype: torch.dtype) -> tuple[str, ...]:
    """What the checkpoint's safetensors headers say, next to the dtype the plan loads."""
    if weights is None:
        return ()
    note = (
        f"stored weights (safetensors headers): {weights.describe()} values; the plan loads the "
        f"floating ones in {_dtype_name(dtype)}"
    )
    return (note,)


def _notes(request: Request) -> tuple[str, ...]:
    anatomy = request.skeleton.anatomy
    notes = [
        "logits: last token only (generate passes logits_to_keep=1)"
        if anatomy.last_token_logits
        else "logits: every prompt token (this model's forward takes no logits_to_keep)",
        (
            f"fixed per GPU: cuBLAS workspace {format_bytes(CALIBRATION.workspace)}, CUDA "
            f"context and kernels {format_bytes(CALIBRATION.cuda_context)} (less the "
            f"{format_bytes(CALIBRATION.cuda_context_at_init)} CUDA starts with, where the budget "
            "is free memory measured now)"
        ),
    ]
    allocator = request.allocator
    if allocator.expandable_segments:
        gap = (
            f"expandable segments: {CALIBRATION.reserved_gap_expandable:.1%}, the margin room "
            f"up to {CALIBRATION.reserved_gap_expandable_worst:.1%}"
        )
    else:
        gap = f"default configuration: {CALIBRATION.reserved_gap:.0%} or the largest fresh block"
    where = {
        "torch": "as torch reports them",
        "environment": "from PYTORCH_ALLOC_CONF/PYTORCH_CUDA_ALLOC_CONF",
        "default": "none set",
    }[allocator.source]
    notes.append(
        f"GPU figures are what the CUDA caching allocator reserves at the peak ({gap} above "
        f"the allocated peak; allocator settings {where})"
    )
    notes += [f"not understood: {item}" for item in _unknown(request)]
    notes += request.stored
    if request.attn.startswith(("flash", "flex")):
        notes.append(f"{request.attn} is modelled like sdpa: no attention scores in memory")
    if request.quantization is not None:
        notes.append(
            f"weights: bitsandbytes {request.quantization.describe()}, as transformers replaces "
            "them (nn.Linear, Conv1D); a forward over several rows (the prefill) dequantises "
            "one weight at a time, counted as an activation"
        )
    if any(d.role == "talker" for d in anatomy.decoders):
        notes.append("talker: weights always; its KV cache and prefill only with audio_output=True")
    return tuple(notes)


def _model_id(model: object, label: str) -> str:
    """What an engine is told to load: a preset's hub id, the path or name given, else the label."""
    if isinstance(model, str):
        return preset_repo(model) or model
    if isinstance(model, os.PathLike):
        return str(os.fspath(model))
    return label


def _parallel_plan(request: Request, parallel: ParallelRequest) -> PlacementPlan:
    skeleton = request.skeleton
    answer = plan_parallel(request, parallel, dtype_name=_dtype_name(skeleton.dtype))
    return PlacementPlan(
        model=skeleton.label,
        strategy="parallel" if answer.fits else "refuse",
        reason=answer.reason,
        device_map=answer.device_map,
        devices=answer.rows,
        dtype=skeleton.dtype,
        attn_implementation=cast("AttnImplementation", request.attn),
        workload=request.workload,
        options=answer.options,
        notes=(
            *_notes(request),
            (
                "parallel: one GPU per pipeline stage is shown; the other tensor-parallel ranks "
                "of a stage hold the same; norms, rotary tables and the tower merger stay whole "
                "on every GPU; the engine's own buffers (CUDA graphs, communication) are not "
                "modelled"
            ),
        ),
        parallel=answer.layout,
    )


def plan_placement(
    model: object,
    *,
    model_class: type | None = None,
    # Keys are DeviceLike or "disk"; Any because Mapping keys are invariant and
    # {0: ..., "cpu": ...} is a dict[object, str] to a type checker.
    budgets: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | str = "auto",
    attn_implementation: str = "auto",
    workload: Workload | None = None,
    allow_offload: bool = False,
    accept_bound: bool = False,
    quantization: object = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
    engine: Engine | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    tensor_parallel: int | None = None,
    pipeline_parallel: int | None = None,
) -> PlacementPlan:
    """Plan where ``model`` goes for ``workload`` on ``budgets``, before loading anything.

    Pure: a skeleton on ``meta`` (no weights, no GPU needed) is sized, each device's peak
    predicted, and the first strategy that fits chosen: one GPU, a split over several, an offload
    (only with ``allow_offload=True``), else a refusal that lists what would fit
    (docs/planning.md explains how).

    Args:
        model: A built-in preset name (``"qwen2.5-omni-7b"``; its Hub id works too, offline),
            a local checkpoint directory (its ``config.json``), any other Hub id (its
            ``config.json``, read in one request of at most 3 s, else from the cache), a
            transformers config, or a model built on ``meta`` (its own dtype is used when it
            matches). A directory's or Hub id's safetensors headers are read too (never the
            weights): the notes give the values stored per dtype, and packed (quantised)
            weights that ``config.json`` does not declare are not understood.
        model_class: The class to build; default: the one the config's ``architectures`` names.
        budgets: ``{device: size}`` such as ``{0: "24GiB", "cpu": "64GiB"}``; GPUs this machine
            lacks are simulated. ``None``: the free memory of each visible GPU now, or the host
            memory on a machine without GPUs. ``cpu`` holds the model only when it is the sole
            budget or with ``allow_offload=True``.
        dtype: ``"auto"``: bfloat16 on GPUs of compute capability 8.0+ (simulated ones count as
            such), float16 on older ones, float32 on the cpu. Or a dtype or its name.
        attn_implementation: ``"auto"`` (flash_attention_2 when it can run here, else sdpa),
            ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...
        workload: What the model will do; default :class:`Workload` ().
        allow_offload: Let weights that fit no GPU go to cpu, then disk (streamed to the main
            device one module at a time; accelerate's ``dispatch_model`` rule).
        quantization: bitsandbytes weights: ``"int8"``, ``"nf4"`` or ``"fp4"`` (4-bit with
            double quantisation; the output embeddings and any vision/audio tower kept in the
            dtype), or a ``transformers.BitsAndBytesConfig`` taken as it is. ``None``: the
            checkpoint's own ``quantization_config`` where it is bitsandbytes'. Sized from what
            transformers replaces (``nn.Linear`` and ``Conv1D`` but the skip modules); the plan
            carries the config to load with (``plan.quantization_config``).
        revision: For a Hub id: the branch, tag or commit whose config is read.
        trust_remote_code: For a Hub id or directory whose config is remote code.
        token: For a gated or private Hub repository (default: ``HF_TOKEN``, the saved login).
        accept_bound: Where the memory model does not understand part of the model (the
            plan's notes say what, and the conservative bound used instead; also a checkpoint
            quantised by a method omnifix does not size), accept a plan that fits on that bound.
            By default such a plan is refused, with this as its option.
        engine: Plan tensor/pipeline parallelism for ``"vllm"``, ``"sglang"`` or ``"torchrun"``
            (transformers' own, through ``load_safely(..., parallel="tensor")``) and write its
            command lines (``plan.parallel.launch``); docs/beyond-one-host.md explains it.
        nodes: Hosts, each with the GPUs of ``budgets`` (default 1).
        gpus_per_node: GPUs per host, the first of ``budgets`` (default: every GPU budgeted).
        tensor_parallel: Use this tensor-parallel size (default: the smallest layout that fits).
        pipeline_parallel: Use this many pipeline stages (default: as for ``tensor_parallel``).

    Returns:
        The plan; ``plan.fits`` says whether to load with ``plan.device_map``.

    Raises:
        UnsupportedModelError: ``model`` is not something the planner can build.
        CheckpointError: No readable config at a path; a safetensors header or index that is
            cut short or corrupt (the message names the file).
        InvalidArgumentError: A bad budget, dtype, attention name, workload (media the model
            has no tower for) or quantization (or one with ``allow_offload=True``); a
            :class:`DeviceError` for a budget key that is not a device; an unknown engine, more
            ``gpus_per_node`` than GPU budgets, or a tensor/pipeline size that does not split
            the model (the message lists the sizes that do).

    Example:
        >>> import omnifix
        >>> work = omnifix.Workload(text_tokens=2048, image_tokens=1280)
        >>> plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "24GiB"}, workload=work)
        >>> plan.strategy, plan.device_map, plan.fits, plan.input_device
        ('single', {'': 'cuda:0'}, True, device(type='cuda', index=0))
        >>> plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "12GiB", 1: "12GiB"})
        >>> plan.strategy, plan.devices_used, plan.boundaries
        ('split', ('cuda:0', 'cuda:1'), 1)
        >>> plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "8GiB"})
        >>> plan.fits, plan.options[0].description, plan.options[0].kind
        (False, '3 GPUs of 8.0 GiB', 'gpus')
        >>> gpus = {i: "24GiB" for i in range(4)}
        >>> plan = omnifix.plan_placement("qwen2-vl-7b", budgets=gpus, engine="vllm")
        >>> plan.strategy, plan.parallel.tensor_parallel, plan.parallel.pipeline_parallel
        ('parallel', 1, 1)
    """
    import torch

    require_workload(workload)
    workload = workload or Workload()
    resolved = resolve_budgets(budgets, allow_offload=allow_offload)
    capabilities = [b.capability or SIMULATED_CAPABILITY for b in resolved if b.is_gpu]
    planned_dtype = choose_dtype(dtype, capabilities=capabilities)
    hub = {"revision": revision, "trust_remote_code": trust_remote_code, "token": token}
    skeleton = load_skeleton(model, model_class=model_class, dtype=planned_dtype, hub=hub)
    attn = _planned_attention(
        attn_implementation, skeleton.dtype, capabilities, skeleton.model_class
    )
    _check_workload(skeleton, workload)
    stored, unsized = stored_quantization(skeleton.config)
    quantized = resolve_quantization(stored if quantization is None else quantization, skeleton)
    weights = stored_weights(model, revision=revision, token=token)
    if quantized is not None:
        if allow_offload:
            raise InvalidArgumentError(
                "quantization with allow_offload=True: bitsandbytes keeps offloaded modules "
                "unquantised, which omnifix does not plan. Pass one of them, e.g. "
                "quantization='nf4' alone."
            )
        skeleton = quantize(skeleton, quantized)
    call = replace(call_of(model, model_class, hub), budgets_given=budgets is not None)
    request = Request(
        skeleton,
        resolved,
        attn,
        workload,
        allow_offload,
        quantization=quantized,
        call=call,
        unsized=_unsized(unsized if quantized is None else None, stored, weights),
        stored=_stored_notes(weights, skeleton.dtype),
    )
    notes = _notes(request)
    parallel = ParallelRequest(
        engine=engine,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        model_id=_model_id(model, skeleton.label),
    )
    if parallel.asked:
        return _parallel_plan(request, parallel)
    strategy, reason, attempt = choose(request)
    unknown = _unknown(request)
    bound_options: tuple[PlanOption, ...] = ()
    if unknown and strategy != "refuse" and not accept_bound:
        bound_options = (bound_option(request, strategy, attempt.rows),)
        strategy = "refuse"
        reason = (
            "the memory model does not understand all of this model (see the notes), so it "
            "fits only on a conservative bound, which is not accepted by default"
        )
    input_name = skeleton.anatomy.input_embeddings
    input_device = None
    if input_name is not None and strategy != "refuse":
        runs_on = Placement.of(attempt.device_map).runs_on(input_name)
        input_device = None if runs_on is None else torch.device(runs_on)
    return PlacementPlan(
        model=skeleton.label,
        strategy=strategy,
        reason=reason,
        device_map=attempt.device_map,
        devices=attempt.rows,
        dtype=skeleton.dtype,
        attn_implementation=attn,
        workload=workload,
        options=bound_options or (options(request) if strategy == "refuse" else ()),
        input_device=input_device,
        notes=notes,
        quantization=quantized,
    )
