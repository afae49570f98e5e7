"""GPU tests: skipped cleanly without CUDA GPUs; each case can record its outcome for the docs.

Set ``OMNIFIX_ZOO_RECORD=path.jsonl`` to append one JSON line per recorded case (stack, before,
after, error text); ``scripts/gpu.sh`` does this and ``docs/bug-zoo.md`` is written from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    count = _gpu_count()
    for item in items:
        if item.get_closest_marker("multi_gpu") and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 CUDA GPUs, this machine has {count}"))
        elif item.get_closest_marker("gpu") and count < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU, this machine has none"))


@pytest.fixture(autouse=True)
def _cuda_initialised(request: pytest.FixtureRequest) -> None:
    """Every GPU test starts with CUDA initialised, whatever ran before it in the process.

    Memory statistics (``reset_peak_memory_stats``, ``memory_allocated``) raise "Invalid device
    argument" until something has initialised CUDA; no test may rely on an earlier one having
    done so.
    """
    if request.node.get_closest_marker("gpu") or request.node.get_closest_marker("multi_gpu"):
        import torch

        torch.cuda.init()


def _stack() -> dict[str, str]:
    import importlib.metadata

    import accelerate
    import torch
    import transformers

    gpus = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    try:
        flash = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        flash = "not installed"
    return {
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "torch": torch.__version__,
        "flash_attn": flash,
        "gpus": f"{torch.cuda.device_count()}x {', '.join(gpus)}",
    }


def _module_apart_map(model: Any, module: str, there: int | str, rest: int | str) -> dict[str, Any]:
    """A device_map with ``module`` on ``there`` and every other piece of ``model`` on ``rest``."""
    device_map: dict[str, Any] = {module: there}
    prefix = ""
    current = model
    for part in module.split("."):
        for name, _ in current.named_children():
            if name != part:
                device_map[prefix + name] = rest
        current = getattr(current, part)
        prefix += part + "."
    return device_map


def _error_of(call: Callable[[], object]) -> str:
    try:
        call()
    except (RuntimeError, NotImplementedError, ValueError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return ""


@pytest.fixture
def error_of() -> Callable[[Callable[[], object]], str]:
    """``error_of(call)``: the first line of the error ``call()`` raises, ``""`` if it runs."""
    return _error_of


@pytest.fixture
def module_apart_map() -> Callable[..., dict[str, Any]]:
    """``module_apart_map(model, "model.visual", 0, 1)``: that module on 0, the rest on 1.

    Module names differ between transformers versions (``visual`` vs ``model.visual``), so tests
    find the module by class and build the map from the model they have.
    """
    return _module_apart_map


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Call ``record(case=..., before=..., after=..., error=...)`` to log a bug-zoo outcome."""

    def write(**fields: Any) -> None:
        path = os.environ.get("OMNIFIX_ZOO_RECORD")
        if not path:
            return
        entry = {"test": request.node.nodeid, **_stack(), **fields}
        with Path(path).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    return write


def _save_medium_qwen2(path: Path) -> Path:
    """A ~200M-parameter random Qwen2 (about 400 MB in bf16): weights dominate every fixed
    overhead, so budgets can force a split."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def _split_cap(path: Path, dtype: torch.dtype, attention: str) -> int:
    """An equal per-GPU budget at which one GPU is too small and two are enough."""
    from omnifix import plan_placement

    huge = {"cuda:0": 2**40, "cuda:1": 2**40}
    alone = plan_placement(path, budgets=huge, dtype=dtype, attn_implementation=attention)
    assert alone.strategy == "single", str(alone)
    used = max(alone.devices, key=lambda device: device.weights)
    # Below what one GPU needs (total + margin), above what half the weights plus each GPU's fixed
    # overhead (CUDA context, margin) need: for a small model the window is narrow.
    for percent in range(95, 40, -5):
        cap = used.total + used.margin - int(used.weights * (100 - percent) / 100)
        plan = plan_placement(
            path,
            budgets={"cuda:0": cap, "cuda:1": cap},
            dtype=dtype,
            attn_implementation=attention,
        )
        if plan.strategy == "split":
            return cap
    pytest.fail(f"no equal budget splits the model over two GPUs; single plan:\n{alone}")


@pytest.fixture
def medium_qwen2(tmp_path: Path) -> Path:
    """A saved ~200M-parameter random Qwen2 checkpoint (see ``_save_medium_qwen2``)."""
    return _save_medium_qwen2(tmp_path / "medium")


@pytest.fixture
def split_cap() -> Callable[[Path, torch.dtype, str], int]:
    """``split_cap(path, dtype, attention)``: an equal per-GPU budget that forces a split."""
    return _split_cap
