"""Hand-over to engines: the command lines that start a parallel plan's layout.

Each engine's flags are written for one pinned release (:data:`RELEASES`); the test data in
``tests/data/engine_flags/`` holds that release's argument definitions, read from its published
source, and a test checks every flag and value written here against them.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from omnifix._plan.budgets import DeviceBudget
    from omnifix._plan.workload import Workload

__all__ = ["RELEASES", "Engine", "EngineLaunch", "EngineRelease", "launch"]

#: The engines omnifix writes command lines for (``torchrun``: transformers' own tensor
#: parallelism through :func:`omnifix.load_safely` with ``parallel="tensor"``).
Engine = Literal["vllm", "sglang", "torchrun"]
#: The address every node uses to reach the first node (set it before running the lines).
NODE0: Final = "${NODE0_ADDR}"
_VLLM_PORT: Final = 6379  # Ray's default head port
_SGLANG_PORT: Final = 50000
_TORCH_PORT: Final = 29500
_PERCENT: Final = 100


@dataclass(frozen=True)
class EngineRelease:
    """The engine release whose arguments omnifix writes, and where they were read."""

    engine: Engine
    release: str
    source: str


#: One pinned release per engine (tests/data/engine_flags/ holds their argument definitions).
RELEASES: Final[dict[Engine, EngineRelease]] = {
    "vllm": EngineRelease(
        "vllm",
        "vLLM 0.11 (main at commit 99d7eb5d)",
        "vllm-project/vllm@99d7eb5d6a512cfcc5a2b104f24ebf2d6cda772b vllm/engine/arg_utils.py",
    ),
    "sglang": EngineRelease(
        "sglang",
        "SGLang 0.5 (main at commit b36e8e19)",
        "sgl-project/sglang@b36e8e198b71553316b55bce53de6ecf9b3a9a47 "
        "docs/advanced_features/server_arguments.md",
    ),
    "torchrun": EngineRelease(
        "torchrun", "torch 2.x torchrun", "torch.distributed.run.get_args_parser (installed)"
    ),
}


@dataclass(frozen=True, kw_only=True)
class EngineLaunch:
    """How to start a parallel plan's layout (``plan.parallel.launch``).

    Attributes:
        engine: ``"vllm"``, ``"sglang"`` or ``"torchrun"``.
        release: The engine release whose arguments these are.
        setup: Shell lines to run first, one ``(node, line)`` each (vLLM's Ray cluster).
        commands: The engine's argv, one ``(node, argv)`` per node, the first node first.
        script: For ``torchrun``: the Python file each rank runs (``run_omnifix.py``).
        notes: What the arguments assume.
    """

    engine: Engine
    release: str
    setup: tuple[tuple[int, str], ...] = field(default=())
    commands: tuple[tuple[int, tuple[str, ...]], ...]
    script: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def text(self) -> str:
        """Every line to run, node by node (``${NODE0_ADDR}`` is the first node's address)."""
        lines = [f"# {self.release}"]
        lines += [f"# on node {node}:\n{line}" for node, line in self.setup]
        lines += [f"# on node {node}:\n{_shell(argv)}" for node, argv in self.commands]
        if self.script:
            lines.append(f"# run_omnifix.py:\n{self.script}")
        lines += [f"# {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (``argv`` lists, ready for ``subprocess``)."""
        data = asdict(self)
        data["setup"] = [{"node": node, "line": line} for node, line in self.setup]
        data["commands"] = [{"node": node, "argv": list(argv)} for node, argv in self.commands]
        data["notes"] = list(self.notes)
        return data


def _shell(argv: Sequence[str]) -> str:
    """The argv as one shell line; ``${NODE0_ADDR}`` stays expandable."""
    return " ".join(f'"{arg}"' if NODE0 in arg else shlex.quote(arg) for arg in argv)


def _fraction(need: int, budget: int) -> float:
    """``need`` as a share of ``budget``, rounded up to a hundredth (at most 1)."""
    return min(1.0, math.ceil(_PERCENT * need / budget) / _PERCENT) if budget else 1.0


def _media(towers: frozenset[str], workload: Workload) -> dict[str, int]:
    """Media per prompt the workload holds, for the towers the model has (0: turned off)."""
    limits = {}
    if "vision" in towers:
        limits["image"] = int(bool(workload.image_tokens))
        limits["video"] = int(bool(workload.video_seconds))
    if "audio" in towers:
        limits["audio"] = int(bool(workload.audio_seconds))
    return limits


def _vllm(
    model_id: str,
    *,
    sizes: tuple[int, int],
    nodes: int,
    encoder: str,
    fraction: float,
    workload: Workload,
    towers: frozenset[str],
    dtype_name: str,
) -> tuple[tuple[tuple[int, str], ...], tuple[str, ...]]:
    tensor, pipeline = sizes
    argv = ["vllm", "serve", model_id, "--tensor-parallel-size", str(tensor)]
    argv += ["--pipeline-parallel-size", str(pipeline)]
    argv += ["--max-model-len", str(workload.prompt_tokens + workload.max_new_tokens)]
    argv += ["--max-num-seqs", str(workload.batch_size)]
    argv += ["--gpu-memory-utilization", f"{fraction:.2f}", "--dtype", dtype_name]
    media = _media(towers, workload)
    if media:
        argv += ["--limit-mm-per-prompt", json.dumps(media, separators=(",", ":"))]
    if encoder == "data":
        argv += ["--mm-encoder-tp-mode", "data"]
    setup: tuple[tuple[int, str], ...] = ()
    if nodes > 1:
        argv += ["--distributed-executor-backend", "ray"]
        setup = ((0, f"ray start --head --port={_VLLM_PORT}"),)
        setup += tuple(
            (node, f'ray start --address="{NODE0}:{_VLLM_PORT}"') for node in range(1, nodes)
        )
    return setup, tuple(argv)


def _sglang(
    model_id: str,
    *,
    sizes: tuple[int, int],
    nodes: int,
    fraction: float,
    workload: Workload,
    dtype_name: str,
) -> tuple[tuple[int, tuple[str, ...]], ...]:
    tensor, pipeline = sizes
    argv = ["python", "-m", "sglang.launch_server", "--model-path", model_id]
    argv += ["--tp-size", str(tensor), "--pp-size", str(pipeline)]
    argv += ["--context-length", str(workload.prompt_tokens + workload.max_new_tokens)]
    argv += ["--max-running-requests", str(workload.batch_size)]
    argv += ["--mem-fraction-static", f"{fraction:.2f}", "--dtype", dtype_name]
    if nodes == 1:
        return ((0, tuple(argv)),)
    return tuple(
        (
            node,
            (
                *argv,
                "--nnodes",
                str(nodes),
                "--node-rank",
                str(node),
                "--dist-init-addr",
                f"{NODE0}:{_SGLANG_PORT}",
            ),
        )
        for node in range(nodes)
    )


def _torchrun(nodes: int, per_node: int) -> tuple[tuple[int, tuple[str, ...]], ...]:
    argv = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
    if nodes == 1:
        return ((0, (*argv, "run_omnifix.py")),)
    return tuple(
        (
            node,
            (
                *argv,
                "--node-rank",
                str(node),
                "--master-addr",
                NODE0,
                "--master-port",
                str(_TORCH_PORT),
                "run_omnifix.py",
            ),
        )
        for node in range(nodes)
    )


def _script(model_id: str, workload: Workload) -> str:
    return "\n".join(
        [
            "import omnifix",
            "from omnifix import Workload",
            "",
            f"workload = {workload!r}",
            "# Each rank checks its share against its GPU, then loads its slice.",
            f"model = omnifix.load_safely({model_id!r}, parallel='tensor', workload=workload)",
            "device = omnifix.input_device(model)  # this rank's GPU: put input_ids there",
        ]
    )


def launch(
    engine: Engine,
    *,
    model_id: str,
    tensor_parallel: int,
    pipeline_parallel: int,
    nodes: int,
    gpus_per_node: int,
    encoder: str,
    workload: Workload,
    towers: frozenset[str],
    rows: tuple[DeviceBudget, ...],
    budget: int,
    dtype_name: str,
) -> EngineLaunch:
    """The command lines that start this layout with ``engine`` (see :class:`EngineLaunch`)."""
    release = RELEASES[engine].release
    sizes = (tensor_parallel, pipeline_parallel)
    if engine == "vllm":
        need = max(row.total + row.margin for row in rows)
        fraction = _fraction(need, budget)
        setup, argv = _vllm(
            model_id,
            sizes=sizes,
            nodes=nodes,
            encoder=encoder,
            fraction=fraction,
            workload=workload,
            towers=towers,
            dtype_name=dtype_name,
        )
        notes: tuple[str, ...] = (
            (
                f"--gpu-memory-utilization {fraction:.2f}: the fullest GPU's predicted peak plus "
                "margin over its budget, taken as the GPU's whole memory; vLLM fills the rest "
                "of that share with KV cache"
            ),
            (
                "--max-model-len: the workload's prompt plus new tokens; --limit-mm-per-prompt: "
                "one of each medium the workload holds, 0 for the others"
            ),
        )
        commands = ((0, argv),)
        return EngineLaunch(
            engine=engine, release=release, setup=setup, commands=commands, notes=notes
        )
    if engine == "sglang":
        need = max(row.weights + row.kv_cache for row in rows)
        fraction = _fraction(need, budget)
        notes = (
            (
                f"--mem-fraction-static {fraction:.2f}: the weights and KV cache of the fullest "
                "GPU over its budget, taken as the GPU's whole memory; activations use the rest"
            ),
        )
        return EngineLaunch(
            engine=engine,
            release=release,
            commands=_sglang(
                model_id,
                sizes=sizes,
                nodes=nodes,
                fraction=fraction,
                workload=workload,
                dtype_name=dtype_name,
            ),
            notes=notes,
        )
    return EngineLaunch(
        engine=engine,
        release=release,
        commands=_torchrun(nodes, gpus_per_node),
        script=_script(model_id, workload),
        notes=("each rank loads its slice through transformers' own tensor parallelism",),
    )
