"""``load_safely(..., parallel="tensor")``: one slice of the model per ``torchrun`` process.

Each rank plans its share (:func:`omnifix.plan_placement` with ``engine="torchrun"``) against its
own device before anything loads, then loads through transformers' own tensor parallelism
(``DistributedConfig(tp_plan="auto")`` in 5.x, ``tp_plan="auto"`` before) and checks that no
weight stayed on ``meta``. docs/beyond-one-host.md explains when to use it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final, Literal

from omnifix._attention import choose_attention_for, choose_dtype, gpu_capabilities
from omnifix._compat import dtype_keyword, tensor_parallel_keyword, transformers_version
from omnifix._meta import assert_no_meta
from omnifix._plan import plan_placement
from omnifix._plan.budgets import host_memory
from omnifix.errors import InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    import torch

    from omnifix._plan import Workload
    from omnifix._types import AttentionRequest

__all__ = ["PARALLEL_MODES", "ParallelMode", "load_tensor_parallel"]

#: ``load_safely(parallel=...)``: ``"tensor"`` slices every layer over the ``torchrun`` ranks.
ParallelMode = Literal["tensor"]
PARALLEL_MODES: Final[tuple[ParallelMode, ...]] = ("tensor",)
_LAUNCH: Final = "torchrun --nproc-per-node N your_script.py"


def _ranks() -> tuple[int, int, int]:
    """``(world size, ranks per node, this rank on its node)`` from torchrun's environment."""
    if "WORLD_SIZE" not in os.environ:
        raise InvalidArgumentError(
            "parallel='tensor' loads one slice of the model per process, and this process was "
            f"not started by torchrun (WORLD_SIZE is not set). Run the script with `{_LAUNCH}` "
            "(omnifix plan MODEL --engine torchrun prints the line for your GPUs), or drop "
            "parallel= to load the whole model in this process.",
            argument="parallel",
        )
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return world, local_world, int(os.environ.get("LOCAL_RANK", "0"))


def _this_device(local_rank: int) -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _budgets(device: torch.device, local_world: int) -> dict[Any, int]:
    """This rank's free memory, taken for every rank of the node (each measures its own)."""
    import torch

    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
        return dict.fromkeys(range(local_world), free)
    return {"cpu": host_memory() // local_world}  # the ranks share the host


def _init_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _tensor_kwargs() -> dict[str, Any]:
    keyword = tensor_parallel_keyword()
    if keyword is None:
        raise UnsupportedModelError(
            f"transformers {transformers_version()} has no tensor-parallel loading "
            "(from_pretrained(tp_plan='auto') arrived in 4.50). Upgrade it: pip install "
            "'transformers>=4.57', or drop parallel= to load on one device or split over GPUs."
        )
    if keyword == "distributed_config":
        from transformers import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    return {"tp_plan": "auto"}


def load_tensor_parallel(
    pretrained: str | os.PathLike[str],
    *,
    config: Any,
    model_class: type[Any],
    dtype: torch.dtype | str,
    attn_implementation: AttentionRequest,
    workload: Workload | None,
    strict: bool,
    from_pretrained_kwargs: dict[str, Any],
) -> Any:
    """This rank's slice of the model, after its share was planned against its device.

    Raises:
        InvalidArgumentError: Not under ``torchrun``, or a rank count that does not split the
            model (the message lists the counts that do).
        InsufficientMemoryError: This rank's share does not fit its device.
        UnsupportedModelError: The installed transformers has no tensor-parallel loading.
        MetaTensorError: Weights ended up on ``meta``.
    """
    world, local_world, local_rank = _ranks()
    tensor_kwargs = _tensor_kwargs()
    device = _this_device(local_rank)
    capabilities = gpu_capabilities([device])
    chosen_dtype = choose_dtype(dtype, capabilities=capabilities)
    attention, planned = choose_attention_for(
        attn_implementation,
        config=config,
        dtype=chosen_dtype,
        capabilities=capabilities,
        model_class=model_class,
        strict=strict,
    )
    # Before anything loads: this rank's slice against its own device.
    plan_placement(
        config,
        model_class=model_class,
        budgets=_budgets(device, local_world),
        dtype=chosen_dtype,
        attn_implementation=planned,
        workload=workload,
        engine="torchrun",
        nodes=max(1, world // local_world),
        gpus_per_node=local_world,
        tensor_parallel=world,
    ).raise_if_refused()
    _init_process_group(device)
    kwargs = {**from_pretrained_kwargs, **tensor_kwargs}
    kwargs[dtype_keyword()] = chosen_dtype
    kwargs["attn_implementation"] = attention
    model = model_class.from_pretrained(pretrained, **kwargs)
    assert_no_meta(model)
    model.eval()
    return model
