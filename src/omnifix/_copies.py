"""A load-time check of the copies a split model makes between GPUs: known contents, both ways.

Faulty peer-to-peer copies (an IOMMU setting, a driver, a board) corrupt the tensors a split
model hands from one GPU to the next without an error anywhere; the model then computes garbage.
torch, accelerate and transformers do not check for it, so omnifix copies a tensor of known
contents between each pair of GPUs once per process and compares.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Final

from omnifix._device_map import place_order
from omnifix.errors import DeviceCopyError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch

__all__ = ["check_copies"]

#: 1 MiB of int32: large enough for the copy engines' bulk path, a fraction of a millisecond.
_ELEMENTS: Final = 1 << 18
#: Ordered pairs already found healthy in this process.
_HEALTHY: set[tuple[str, str]] = set()


def _copy(tensor: torch.Tensor, target: torch.device) -> torch.Tensor:
    return tensor.to(target)


def check_copies(
    devices: Iterable[str],
    *,
    copy: Callable[[torch.Tensor, torch.device], torch.Tensor] = _copy,
) -> int:
    """Copy known contents between every ordered pair of the GPUs in ``devices``; raise on a change.

    Each pair is checked once per process (a healthy pair is remembered); ``copy`` is how a
    tensor crosses (``tensor.to(target)``, what every device hook does). Returns how many pairs
    were checked now.

    Raises:
        DeviceCopyError: A copy arrived changed; the first such pair, with how many values.

    Example:
        >>> from omnifix._copies import check_copies
        >>> check_copies(["cpu"])  # no pair of GPUs: nothing to check
        0
    """
    import torch

    # GPUs this process has (a map may name devices of a simulated machine: nothing to copy).
    present = {f"cuda:{index}" for index in range(torch.cuda.device_count())}
    gpus = sorted(present.intersection(devices), key=place_order)
    pairs = [pair for pair in itertools.permutations(gpus, 2) if pair not in _HEALTHY]
    if not pairs:
        return 0
    # Random bits (a fixed seed), made on the host and sent to each GPU over the host link: the
    # reference every peer copy is compared with on its target.
    pattern = torch.randint(
        -(2**31),
        2**31 - 1,
        (_ELEMENTS,),
        dtype=torch.int32,
        generator=torch.Generator().manual_seed(0),
    )
    reference = {name: pattern.to(name) for name in gpus}
    for source, target in pairs:
        arrived = copy(reference[source], torch.device(target))
        differing = int((arrived != reference[target]).sum().item())
        if differing:
            raise DeviceCopyError(
                f"Copies from {source} to {target} arrive changed ({differing} of {_ELEMENTS} "
                "values differ): peer-to-peer copies between these GPUs are faulty on this host, "
                "and a model split over them would compute wrong results without an error. Fix: "
                f"load on one GPU (device='{source}') or on GPUs whose copies are sound "
                "(CUDA_VISIBLE_DEVICES); on the host, check the IOMMU setting (e.g. the kernel "
                "parameter iommu=pt) and the NVIDIA driver, and test the pair with CUDA's "
                "p2pBandwidthLatencyTest.",
                source=source,
                target=target,
                differing=differing,
            )
        _HEALTHY.add((source, target))
    return len(pairs)
