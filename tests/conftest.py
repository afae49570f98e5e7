"""Shared fixtures: tiny real models saved to disk, so tests take the real from_pretrained path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import ModuleType

#: Test modules whose outcome does not depend on the transformers version (the command line's
#: surface, the package's structure, the benchmark harnesses): marked ``any_stack``, which
#: scripts/test.sh runs on the newest stack only. What they drive underneath (planning, loading,
#: tiny models) is tested on every stack by the other modules.
ANY_STACK = frozenset(
    {
        "test_benchmarks_accuracy.py",
        "test_benchmarks_capacity.py",
        "test_benchmarks_overhead.py",
        "test_benchmarks_timing.py",
        "test_cli.py",
        "test_cli_demo.py",
        "test_cli_plan.py",
        "test_package.py",
        "test_structure.py",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`ANY_STACK`'s modules ``any_stack``."""
    for item in items:
        if item.path.name in ANY_STACK:
            item.add_marker(pytest.mark.any_stack)


#: The benchmark scripts: a folder on no import path, whose modules import each other by name.
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _save_tiny_qwen2(path: Path, *, tie_word_embeddings: bool) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    Qwen2ForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 causal LM (plain text model) saved with ``save_pretrained``."""
    return _save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tied_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``tiny_lm_dir`` but with ``lm_head`` tied to ``embed_tokens``."""
    return _save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def benchmark_suite() -> Iterator[Callable[[str], ModuleType]]:
    """``load("accuracy")`` imports ``benchmarks/accuracy.py`` (once per session)."""
    loaded: dict[str, ModuleType] = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.syspath_prepend(str(BENCHMARKS))  # suites import _results, _memory, _timing

        def load(name: str) -> ModuleType:
            if name not in loaded:
                path = BENCHMARKS / f"{name}.py"
                spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
                assert spec is not None
                assert spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look it up
                spec.loader.exec_module(module)
                loaded[name] = module
            return loaded[name]

        yield load


@pytest.fixture(scope="session")
def bench_models(benchmark_suite: Callable[[str], ModuleType]) -> ModuleType:
    """``benchmarks/_models.py``: ``materialize``, ``workload_inputs``, ``layer_split_map``.

    The CPU tests and the GPU tests (``tests/gpu``) build their models and maps with the same code
    as the benchmark suites.
    """
    return benchmark_suite("_models")


@pytest.fixture(scope="session")
def bench_memory(benchmark_suite: Callable[[str], ModuleType]) -> ModuleType:
    """``benchmarks/_memory.py``: ``set_attention``, ``outside_allocator`` and the phase model."""
    return benchmark_suite("_memory")


@pytest.fixture
def linear_attention_config() -> Any:
    """A tiny Qwen3-Next config: linear-attention layers the memory model does not size."""
    import transformers

    config_class = getattr(transformers, "Qwen3NextConfig", None)
    if config_class is None:
        pytest.skip("no Qwen3-Next (linear attention) in this transformers")
    return config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    )
