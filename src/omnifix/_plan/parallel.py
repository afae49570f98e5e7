"""Parallel plans: tensor and pipeline parallelism over ``nodes x gpus_per_node`` GPUs.

A layout is ``tensor_parallel`` GPUs that each hold a slice of every layer (its attention heads,
KV heads and MLP columns; the embeddings and ``lm_head`` by vocabulary rows) times
``pipeline_parallel`` stages that each hold a contiguous run of layers. One GPU of each stage is
sized with the single-host memory model: :func:`omnifix._plan.strategies.evaluate` on a
per-rank skeleton (the sliced sizes and widths), so the margins, overheads and phase peaks are
the planner's own. docs/beyond-one-host.md explains the rules and the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from omnifix._plan.code import workload_source
from omnifix._plan.engines import Engine, EngineLaunch, launch
from omnifix._plan.options import PlanOption, plan_option
from omnifix._plan.strategies import Attempt, Request, evaluate
from omnifix._units import format_bytes
from omnifix.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from omnifix._plan.anatomy import Anatomy, Decoder, Tower
    from omnifix._plan.budgets import Budget, DeviceBudget
    from omnifix._plan.skeleton import Skeleton

__all__ = ["ENGINES", "EncoderMode", "ParallelLayout", "ParallelRequest", "plan_parallel"]
__all__ += ["valid_tensor_parallel"]

#: The engines a parallel plan can hand over to.
ENGINES: Final[tuple[Engine, ...]] = get_args(Engine)
#: How the vision/audio towers are spread: ``"weights"`` (sliced like the layers), ``"data"``
#: (whole on every GPU, each encoding its own images: vLLM's ``mm_encoder_tp_mode="data"``),
#: ``"replicated"`` (whole on every GPU: transformers' tensor plans cover the language model only)
#: or ``"none"`` (no tower).
EncoderMode = Literal["weights", "data", "replicated", "none"]
#: The most rejected layouts a reason names.
_SHOWN_REJECTED: Final = 3
#: Halvings of the text tokens that a refusal tries as an option.
_SHORTER_STEPS: Final = 6
#: At most this many times the nodes asked for, when a refusal looks for enough of them.
_MORE_NODES: Final = 8


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Which parallel layout a plan uses, and how to start it (``plan.parallel``).

    Attributes:
        engine: ``"vllm"``, ``"sglang"`` or ``"torchrun"`` (transformers' tensor parallelism).
        tensor_parallel: GPUs that share every layer (a slice each).
        pipeline_parallel: Stages of consecutive layers, one after another.
        nodes: Hosts the layout uses.
        gpus_per_node: GPUs it uses on each host.
        encoder: How the towers are spread (see :data:`EncoderMode`).
        valid_tensor_parallel: Every tensor-parallel size the engine accepts for this model
            (they divide its attention heads, KV heads and MLP as the engine requires), up to
            the GPUs offered.
        launch: The engine's command lines for this layout (``None`` for a refusal).
    """

    engine: Engine
    tensor_parallel: int
    pipeline_parallel: int
    nodes: int
    gpus_per_node: int
    encoder: EncoderMode
    valid_tensor_parallel: tuple[int, ...]
    launch: EngineLaunch | None = None

    @property
    def gpus(self) -> int:
        """GPUs in all: tensor parallel x pipeline parallel."""
        return self.tensor_parallel * self.pipeline_parallel

    def __str__(self) -> str:
        """``tensor parallel 4 x pipeline parallel 2 on 2 nodes x 4 GPUs (vllm)``."""
        nodes = "node" if self.nodes == 1 else "nodes"
        return (
            f"tensor parallel {self.tensor_parallel} x pipeline parallel "
            f"{self.pipeline_parallel} on {self.nodes} {nodes} x {self.gpus_per_node} GPUs "
            f"({self.engine}; towers: {self.encoder})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The layout as JSON-ready data."""
        return {
            "engine": self.engine,
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "encoder": self.encoder,
            "valid_tensor_parallel": list(self.valid_tensor_parallel),
            "launch": None if self.launch is None else self.launch.to_dict(),
        }


@dataclass(frozen=True, kw_only=True)
class ParallelRequest:
    """What a parallel plan is asked for (``plan_placement``'s parallel options)."""

    engine: Engine | None
    nodes: int | None = None
    gpus_per_node: int | None = None
    tensor_parallel: int | None = None
    pipeline_parallel: int | None = None
    #: What the engine is told to load (a hub id or a path).
    model_id: str = ""

    @property
    def asked(self) -> bool:
        """Whether any parallel option was given (else the single-host planner answers)."""
        return any(
            value is not None
            for value in (
                self.engine,
                self.nodes,
                self.gpus_per_node,
                self.tensor_parallel,
                self.pipeline_parallel,
            )
        )


@dataclass(frozen=True)
class _Try:
    """One layout tried: its sizes, tower mode and what it predicts per stage."""

    tensor: int
    pipeline: int
    encoder: EncoderMode
    attempt: Attempt

    @property
    def fits(self) -> bool:
        return self.attempt.fits

    @property
    def short(self) -> int:
        return max((-row.headroom for row in self.attempt.rows), default=0)


def _count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}={value!r} is not a count. Pass a whole number >= 1.")
    return value


def _divides(size: int, *counts: int) -> bool:
    return all(count % size == 0 for count in counts if count)


def _kv_fits(engine: Engine, size: int, kv_heads: int) -> bool:
    """Whether ``size`` ranks can share the KV heads.

    vLLM and SGLang replicate KV heads over ranks when there are fewer; transformers cannot.
    """
    if engine == "torchrun":
        return kv_heads % size == 0
    return kv_heads % size == 0 or size % kv_heads == 0


def _text_ok(engine: Engine, size: int, decoder: Decoder) -> bool:
    vocab = decoder.vocab if engine == "torchrun" else 0  # vLLM and SGLang pad the vocabulary
    return _divides(size, decoder.heads, decoder.intermediate, vocab) and _kv_fits(
        engine, size, decoder.kv_heads
    )


def _tower_ok(size: int, tower: Tower) -> bool:
    return _divides(size, tower.heads, tower.intermediate)


def _encoder_modes(engine: Engine, size: int, anatomy: Anatomy) -> tuple[EncoderMode, ...]:
    """The tower modes the engine can run at this size, the faster first."""
    if not anatomy.towers:
        return ("none",)
    if engine == "torchrun" or size == 1:
        return ("replicated",)
    sliceable = all(_tower_ok(size, tower) for tower in anatomy.towers)
    if engine == "vllm":
        return ("data", "weights") if sliceable else ("data",)
    return ("weights",) if sliceable else ()


def valid_tensor_parallel(anatomy: Anatomy, engine: Engine, most: int) -> tuple[int, ...]:
    """The tensor-parallel sizes up to ``most`` that ``engine`` accepts for this model.

    Every decoder's attention heads and MLP width divide by the size; its KV heads too (vLLM
    and SGLang also take sizes that the KV heads divide, each rank then holding one copy);
    transformers' plans also slice the vocabulary. SGLang slices the towers too, so their heads
    and MLP must divide as well; vLLM can keep them whole (``--mm-encoder-tp-mode data``).

    Example:
        >>> from omnifix._plan.anatomy import describe
        >>> from omnifix._plan.skeleton import build_skeleton
        >>> anatomy = describe(build_skeleton("qwen2-vl-7b"))  # 28 heads, 4 KV heads
        >>> valid_tensor_parallel(anatomy, "vllm", 8)
        (1, 2, 4)
    """
    return tuple(
        size
        for size in range(1, most + 1)
        if all(_text_ok(engine, size, d) for d in anatomy.decoders)
        and _encoder_modes(engine, size, anatomy)
    )


def _slice_decoder(decoder: Decoder, size: int) -> Decoder:
    return replace(
        decoder,
        heads=decoder.heads // size,
        kv_heads=max(1, decoder.kv_heads // size),
        intermediate=math.ceil(decoder.intermediate / size),
    )


def _slice_tower(tower: Tower, size: int) -> Tower:
    return replace(
        tower,
        heads=max(1, tower.heads // size),
        intermediate=math.ceil(tower.intermediate / size),
    )


def _rank_anatomy(anatomy: Anatomy, engine: Engine, size: int, encoder: EncoderMode) -> Anatomy:
    """One rank's anatomy: sliced heads and MLPs; serving engines make last-token logits only."""
    towers = anatomy.towers
    if encoder == "weights":
        towers = tuple(_slice_tower(tower, size) for tower in towers)
    sliced = replace(
        anatomy, decoders=tuple(_slice_decoder(d, size) for d in anatomy.decoders), towers=towers
    )
    if engine == "torchrun":  # transformers' own generate, as the single-host planner models it
        return sliced
    return replace(sliced, last_token_logits=True, logits_upcast=False)


def _tensors(skeleton: Skeleton) -> Iterator[str]:
    model = skeleton.model
    yield from (name for name, _ in model.named_parameters())
    yield from (name for name, _ in model.named_buffers())


def _rank_sizes(skeleton: Skeleton, size: int, encoder: EncoderMode) -> dict[str, int]:
    """Bytes of every module on one rank: sliced layers, vocabulary and (``weights``) towers.

    Norms and everything outside the layers, embeddings, ``lm_head`` and tower blocks stay
    whole on every rank.
    """
    anatomy = skeleton.anatomy
    sliced = [layer for decoder in anatomy.decoders for layer in decoder.layers]
    if encoder == "weights":
        sliced += [block for tower in anatomy.towers for block in tower.blocks]
    vocabulary = [name for name in (anatomy.input_embeddings, anatomy.lm_head) if name]

    def divisor(name: str) -> int:
        leaf = name.rpartition(".")[0].rpartition(".")[2]
        if any(name.startswith(f"{prefix}.") for prefix in vocabulary):
            return size
        inside = any(name.startswith(f"{prefix}.") for prefix in sliced)
        return size if inside and "norm" not in leaf else 1

    sizes = dict(skeleton.sizes)
    if size == 1:
        return sizes
    for name in _tensors(skeleton):
        whole = skeleton.sizes.get(name, 0)
        cut = whole - whole // divisor(name)
        if not cut:
            continue
        parts = name.split(".")
        for end in range(len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in sizes:
                sizes[prefix] -= cut
    return sizes


def _stage_map(skeleton: Skeleton, stages: int, device: Callable[[int], str]) -> dict[str, str]:
    """Consecutive text layers per stage, as even as they split.

    What precedes the first layer (embeddings, towers) goes on the first stage, what follows
    the last (norm, ``lm_head``) on the last.
    """
    text = skeleton.anatomy.text
    if stages == 1 or text is None:
        return {"": device(0)}
    layers = text.layers
    stage_of = {layer: index * stages // len(layers) for index, layer in enumerate(layers)}
    order = skeleton.order
    first = order.get(layers[0], 0)
    found: dict[str, str] = {}

    def place(name: str, module: Any) -> None:
        if name in stage_of:
            found[name] = device(stage_of[name])
            return
        if not any(layer.startswith(f"{name}.") or not name for layer in layers):
            found[name] = device(0 if order.get(name, 0) < first else stages - 1)
            return
        for child, sub in module.named_children():
            place(f"{name}.{child}" if name else child, sub)
        for tensor, _ in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            key = f"{name}.{tensor}" if name else tensor
            found[key] = device(0 if order.get(key, 0) < first else stages - 1)

    place("", skeleton.model)
    return found


def _try(request: Request, layout: tuple[Engine, int, int, EncoderMode], budget: Budget) -> _Try:
    engine, size, stages, encoder = layout
    skeleton = request.skeleton
    rank = replace(
        skeleton,
        anatomy=_rank_anatomy(skeleton.anatomy, engine, size, encoder),
        sizes=_rank_sizes(skeleton, size, encoder),
    )
    if budget.is_gpu:
        budgets = tuple(replace(budget, device=f"cuda:{stage}") for stage in range(stages))
    else:
        budgets = (budget,)
    staged = replace(request, skeleton=rank, budgets=budgets, allow_offload=False)
    device_map = _stage_map(rank, stages, lambda stage: budgets[stage].device)
    return _Try(size, stages, encoder, evaluate(staged, device_map))


def _stage_names(device_map: dict[str, str]) -> dict[str, str]:
    """The map with each stage's stand-in GPU named ``stage N``."""
    return {
        name: f"stage {value[5:]}" if value.startswith("cuda:") else f"each rank ({value})"
        for name, value in device_map.items()
    }


def _rows(found: _Try) -> tuple[DeviceBudget, ...]:
    """The attempt's rows, one per stage, named ``stage N`` (``each rank`` on the cpu)."""
    named = []
    for index, row in enumerate(found.attempt.rows):
        name = f"stage {index}" if row.device.startswith("cuda:") else f"each rank ({row.device})"
        named.append(replace(row, device=name))
    return tuple(named)


@dataclass(frozen=True)
class _Grid:
    """The GPUs offered: nodes x per node, each with the same (smallest) budget."""

    nodes: int
    per_node: int
    budget: Budget


def _grid(request: Request, parallel: ParallelRequest) -> _Grid:
    nodes = _count(parallel.nodes, "nodes") or 1
    per_node = _count(parallel.gpus_per_node, "gpus_per_node")
    gpus = request.gpus
    if not gpus:
        cpu = request.budget("cpu")
        if cpu is None or per_node is None:
            raise InvalidArgumentError(
                "A parallel plan needs GPU budgets, e.g. budgets={0: '24GiB', 1: '24GiB'}, or a "
                "'cpu' budget per rank with gpus_per_node= (processes per host) for ranks on "
                "the cpu."
            )
        return _Grid(nodes, per_node, cpu)
    if per_node is None:
        per_node = len(gpus)
    if per_node > len(gpus):
        raise InvalidArgumentError(
            f"gpus_per_node={per_node} but the budgets give {len(gpus)} GPU(s) "
            f"({', '.join(b.device for b in gpus)}); every GPU of a node needs a budget. Pass "
            f"gpus_per_node between 1 and {len(gpus)}, or a budget for each of {per_node} GPUs, "
            f"e.g. budgets={{i: '24GiB' for i in range({per_node})}}.",
            argument="gpus_per_node",
            valid=tuple(range(1, len(gpus) + 1)),
        )
    smallest = min(gpus[:per_node], key=lambda b: b.size)
    return _Grid(nodes, per_node, smallest)


def _check_size(value: int | None, name: str, valid: tuple[int, ...], why: str) -> None:
    if value is not None and value not in valid:
        raise InvalidArgumentError(
            f"{name}={value} {why}. Sizes that work: {', '.join(map(str, valid)) or 'none'}. "
            f"Pass one of them, or leave {name} out to let the planner choose.",
            argument=name,
            valid=valid,
        )


def _layouts(
    request: Request, parallel: ParallelRequest, engine: Engine, grid: _Grid
) -> tuple[list[tuple[int, int, EncoderMode]], tuple[int, ...]]:
    """Every allowed ``(tensor, pipeline, encoder)`` and the valid tensor sizes.

    The fewest GPUs first, then the least pipelining.
    """
    anatomy = request.skeleton.anatomy
    total = grid.nodes * grid.per_node
    # vLLM and SGLang keep tensor parallelism within a host (pipeline stages cross hosts);
    # transformers has no pipeline stages, so its tensor parallelism spans every GPU.
    widest = total if engine == "torchrun" else grid.per_node
    valid = valid_tensor_parallel(anatomy, engine, widest)
    text = anatomy.text
    if parallel.tensor_parallel is not None:
        heads = "" if text is None else f" {text.heads} attention and {text.kv_heads} KV heads,"
        _check_size(
            _count(parallel.tensor_parallel, "tensor_parallel"),
            "tensor_parallel",
            valid,
            f"does not split {request.skeleton.label}'s{heads} MLP and towers the way {engine} "
            f"requires, or exceeds the {widest} GPUs it may span",
        )
    most_stages = 1 if engine == "torchrun" else min(total, len(text.layers) if text else 1)
    stages = tuple(range(1, most_stages + 1))
    if parallel.pipeline_parallel is not None:
        why = (
            "is not possible: transformers' tensor parallelism has no pipeline stages"
            if engine == "torchrun"
            else f"exceeds the {total} GPUs or the model's layers"
        )
        wanted = _count(parallel.pipeline_parallel, "pipeline_parallel")
        _check_size(wanted, "pipeline_parallel", stages, why)
    sizes = [parallel.tensor_parallel] if parallel.tensor_parallel else list(valid)
    pipes = [parallel.pipeline_parallel] if parallel.pipeline_parallel else list(stages)
    found = [
        (size, pipe, mode)
        for size in sizes
        for pipe in pipes
        if size * pipe <= total
        for mode in _encoder_modes(engine, size, anatomy)
    ]
    found.sort(key=lambda layout: (layout[0] * layout[1], layout[1]))
    return found, valid


def _placement(grid: _Grid, size: int, stages: int) -> tuple[int, int]:
    """``(nodes, gpus per node)`` that a layout of ``size x stages`` GPUs uses."""
    gpus = size * stages
    if gpus <= grid.per_node:
        return 1, gpus
    return math.ceil(gpus / grid.per_node), grid.per_node


def _why(found: _Try, rejected: list[_Try], grid: _Grid, engine: Engine) -> str:
    rows = found.attempt.rows
    worst = max(rows, key=lambda row: (row.total + row.margin) / max(1, row.budget))
    held = (
        f"each GPU holds 1/{found.tensor} of every layer's heads and MLP and of the vocabulary"
        if found.tensor > 1
        else "each GPU holds whole layers"
    )
    parts = [
        (
            f"tensor parallel {found.tensor} x pipeline parallel {found.pipeline} ({engine}) is "
            f"the smallest layout that fits: {held}"
        )
    ]
    if found.pipeline > 1:
        parts.append(f"each of {found.pipeline} stages a run of consecutive layers")
    if found.encoder in ("data", "replicated"):
        parts.append("the towers whole on every GPU")
    elif found.encoder == "weights":
        parts.append(f"1/{found.tensor} of each tower layer")
    parts.append(
        f"peak {format_bytes(worst.total)} + {format_bytes(worst.margin)} margin of "
        f"{format_bytes(grid.budget.size)} on the fullest GPU"
    )
    if rejected:
        shown = ", ".join(
            f"{t.tensor}x{t.pipeline} (towers {t.encoder}) {format_bytes(t.short)} short"
            for t in rejected[:_SHOWN_REJECTED]
        )
        parts.append(f"smaller layouts do not fit ({shown})")
    return "; ".join(parts)


def _search(
    request: Request, parallel: ParallelRequest, engine: Engine, grid: _Grid
) -> tuple[_Try | None, list[_Try], tuple[int, ...]]:
    """The first layout that fits (or ``None``), the rejected ones, the valid tensor sizes."""
    layouts, valid = _layouts(request, parallel, engine, grid)
    rejected: list[_Try] = []
    for size, stages, mode in layouts:
        attempt = _try(request, (engine, size, stages, mode), grid.budget)
        if attempt.fits:
            return attempt, rejected, valid
        rejected.append(attempt)
    return None, rejected, valid


@dataclass(frozen=True)
class ParallelAnswer:
    """What :func:`plan_parallel` found: the rows, why, the layout and a refusal's options."""

    fits: bool
    reason: str
    rows: tuple[DeviceBudget, ...]
    device_map: dict[str, str]
    layout: ParallelLayout
    options: tuple[PlanOption, ...] = field(default=())


def _asked(parallel: ParallelRequest) -> dict[str, str]:
    """The parallel keywords of ``plan_placement`` that ``parallel`` was asked with, as source."""
    fields = ("engine", "nodes", "gpus_per_node", "tensor_parallel", "pipeline_parallel")
    values = {name: getattr(parallel, name) for name in fields}
    return {name: repr(value) for name, value in values.items() if value is not None}


def _options(
    request: Request, parallel: ParallelRequest, engine: Engine, grid: _Grid
) -> list[PlanOption]:
    """Changes that fit, each checked by planning again: more nodes, fewer text tokens."""
    found = []
    for nodes in range(grid.nodes + 1, grid.nodes * _MORE_NODES + 1):
        more = replace(parallel, nodes=nodes)
        fit, _, _ = _search(request, more, engine, replace(grid, nodes=nodes))
        if fit is not None:
            description = (
                f"{nodes} nodes of {grid.per_node} GPUs of {format_bytes(grid.budget.size)} "
                f"(tensor parallel {fit.tensor} x pipeline parallel {fit.pipeline})"
            )
            changes = {**_asked(parallel), "nodes": str(nodes)}
            found.append(
                plan_option(
                    request, "gpus", description, changes, strategy="parallel", rows=_rows(fit)
                )
            )
            break
    load = request.workload
    tokens = load.text_tokens
    for _ in range(_SHORTER_STEPS):
        tokens //= 2
        if tokens < 1:
            break
        shorter = replace(request, workload=replace(load, text_tokens=tokens))
        fit, _, _ = _search(shorter, parallel, engine, grid)
        if fit is not None:
            description = (
                f"at most {tokens} text tokens per sample (tensor parallel {fit.tensor} x "
                f"pipeline parallel {fit.pipeline})"
            )
            changes = {**_asked(parallel), "workload": workload_source(shorter.workload)}
            found.append(
                plan_option(
                    shorter, "workload", description, changes, strategy="parallel", rows=_rows(fit)
                )
            )
            break
    return found


def plan_parallel(
    request: Request, parallel: ParallelRequest, *, dtype_name: str
) -> ParallelAnswer:
    """The smallest tensor x pipeline layout that fits, with the engine's command lines.

    Raises:
        InvalidArgumentError: No engine named, an unknown engine, more GPUs per node than
            budgets, or a tensor/pipeline size that does not work (the message lists those that
            do).
    """
    engine = parallel.engine
    if engine is None or engine not in ENGINES:
        known = ", ".join(repr(name) for name in ENGINES)
        got = "no engine" if engine is None else f"engine={engine!r}"
        raise InvalidArgumentError(
            f"A parallel plan is for an engine that runs it, and {got} was given; omnifix "
            f"writes the arguments of {known}. Pass engine= one of those (torchrun: "
            "transformers' own tensor parallelism, load_safely(..., parallel='tensor')).",
            argument="engine",
            valid=ENGINES,
        )
    grid = _grid(request, parallel)
    found, rejected, valid = _search(request, parallel, engine, grid)
    if found is None:
        closest = min(rejected, key=lambda t: (t.short, -t.tensor * t.pipeline))
        nodes, per_node = _placement(grid, closest.tensor, closest.pipeline)
        layout = ParallelLayout(
            engine=engine,
            tensor_parallel=closest.tensor,
            pipeline_parallel=closest.pipeline,
            nodes=nodes,
            gpus_per_node=per_node,
            encoder=closest.encoder,
            valid_tensor_parallel=valid,
        )
        shortfalls = ", ".join(
            f"{row.device} {format_bytes(-row.headroom)} short"
            for row in _rows(closest)
            if not row.fits
        )
        reason = (
            f"no layout of at most {grid.nodes} x {grid.per_node} GPUs of "
            f"{format_bytes(grid.budget.size)} fits with {engine} (tensor sizes "
            f"{', '.join(map(str, valid))}); the closest, {closest.tensor}x{closest.pipeline}, "
            f"leaves {shortfalls}"
        )
        return ParallelAnswer(
            fits=False,
            reason=reason,
            rows=_rows(closest),
            device_map=_stage_names(closest.attempt.device_map),
            layout=layout,
            options=tuple(_options(request, parallel, engine, grid)),
        )
    nodes, per_node = _placement(grid, found.tensor, found.pipeline)
    rows = _rows(found)
    layout = ParallelLayout(
        engine=engine,
        tensor_parallel=found.tensor,
        pipeline_parallel=found.pipeline,
        nodes=nodes,
        gpus_per_node=per_node,
        encoder=found.encoder,
        valid_tensor_parallel=valid,
    )
    handover = launch(
        engine,
        model_id=parallel.model_id or request.skeleton.label,
        tensor_parallel=found.tensor,
        pipeline_parallel=found.pipeline,
        nodes=nodes,
        gpus_per_node=per_node,
        encoder=found.encoder,
        workload=request.workload,
        towers=frozenset(tower.kind for tower in request.skeleton.anatomy.towers),
        rows=rows,
        budget=grid.budget.size,
        dtype_name=dtype_name,
    )
    return ParallelAnswer(
        fits=True,
        reason=_why(found, rejected, grid, engine),
        rows=rows,
        device_map=_stage_names(found.attempt.device_map),
        layout=replace(layout, launch=handover),
    )
