"""The load-time check of copies between GPUs: a faulty copy is named before a model uses it."""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING

import pytest

import omnifix
from omnifix._copies import check_copies
from omnifix.errors import DeviceCopyError

if TYPE_CHECKING:
    import torch


def _flip_one_bit(tensor: torch.Tensor, target: torch.device) -> torch.Tensor:
    """A copy that arrives with one value changed, as a faulty peer-to-peer link delivers it."""
    arrived = tensor.to("cpu", copy=True)
    arrived[12345] ^= 1
    return arrived.to(target)


def test_a_changed_copy_names_the_pair_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_gpus(monkeypatch, 2)
    with pytest.raises(DeviceCopyError) as raised:
        check_copies(["cuda:0", "cuda:1", "cpu"], copy=_flip_one_bit)
    error = raised.value
    assert isinstance(error, RuntimeError)
    assert isinstance(error, omnifix.OmnifixError)
    assert (error.source, error.target, error.differing) == ("cuda:0", "cuda:1", 1)
    message = str(error)
    assert message.startswith("Copies from cuda:0 to cuda:1 arrive changed (1 of 262144 values")
    assert "device='cuda:0'" in message
    assert "iommu=pt" in message
    copied = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object
    assert (copied.source, copied.target, copied.differing) == ("cuda:0", "cuda:1", 1)


def test_sound_copies_are_checked_once_per_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_gpus(monkeypatch, 5)
    assert check_copies(["cuda:2", "cuda:3"]) == 2  # both directions
    assert check_copies(["cuda:3", "cuda:2", "cpu"]) == 0  # remembered
    assert check_copies(["cuda:2", "cuda:3", "cuda:4"]) == 4  # only the new pairs


def test_one_device_the_cpu_and_absent_gpus_have_nothing_to_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _simulate_gpus(monkeypatch, 1)
    assert check_copies([]) == 0
    assert check_copies(["cpu", "disk"]) == 0
    assert check_copies(["cuda:0"]) == 0
    assert check_copies(["cuda:0", "cuda:7"]) == 0  # cuda:7 is not in this process


def _simulate_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """``count`` GPUs whose memory is the host's: the copies are real, only the names are not."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.Tensor, "to", _host_to(torch.Tensor.to))


def _host_to(original):  # type: ignore[no-untyped-def]
    """``Tensor.to`` with every CUDA device answered by the host (this machine has no GPU)."""
    import torch

    def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        args = tuple(
            "cpu" if isinstance(a, (str, torch.device)) and str(a).startswith("cuda") else a
            for a in args
        )
        return original(self, *args, **kwargs)

    return to
