"""Parallel plans: tensor x pipeline layouts, the engines' command lines, and bad input."""

from __future__ import annotations

import argparse
import json
import pathlib
from functools import cache
from typing import Any

import pytest
import transformers
from packaging.version import Version

import omnifix
from omnifix import InvalidArgumentError, Workload
from omnifix._cli import main

QWEN25 = pytest.mark.skipif(
    Version(Version(transformers.__version__).base_version) < Version("4.49"),
    reason="the Qwen2.5-VL presets planned here need transformers>=4.49",
)
FLAGS = pathlib.Path(__file__).parent / "data" / "engine_flags"
LONG = Workload(text_tokens=32768, image_tokens=1280)


@cache
def engine_flags(engine: str) -> dict[str, Any]:
    """The pinned release's argument definitions (tests/data/engine_flags/<engine>-*.json)."""
    (path,) = FLAGS.glob(f"{engine}-*.json")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def check_argv(engine: str, argv: tuple[str, ...]) -> None:
    """Every flag exists in the pinned release, with a value of its type (or among choices)."""
    data = engine_flags(engine)
    command = data["command"]
    assert list(argv[: len(command)]) == command
    rest = list(argv[len(command) + data["positional"] :])
    known = {alias: spec for flag, spec in data["flags"].items() for alias in [flag]}
    while rest:
        flag = rest.pop(0)
        assert flag in known, f"{flag} is no {data['release']} argument"
        spec = known[flag]
        value = rest.pop(0)
        kind = spec["type"]
        if kind == "int":
            int(value)
        elif kind == "float":
            assert 0 < float(value) <= 1
        elif kind == "json":
            assert isinstance(json.loads(value), dict)
        if "choices" in spec:
            assert value in spec["choices"], (flag, value)


@cache
def plan(model: str, engine: str, size: str, count: int, **options: Any) -> omnifix.PlacementPlan:
    budgets = dict.fromkeys(range(count), size)
    return omnifix.plan_placement(model, budgets=budgets, engine=engine, **options)


@QWEN25
def test_long_context_needs_tensor_parallelism_and_takes_the_smallest_that_fits() -> None:
    found = plan("qwen2.5-vl-7b", "vllm", "8GiB", 4, workload=LONG)
    assert found.fits
    assert found.strategy == "parallel"
    assert found.parallel is not None
    assert (found.parallel.tensor_parallel, found.parallel.pipeline_parallel) == (4, 1)
    assert found.parallel.gpus == 4
    assert "smaller layouts do not fit (1x1" in found.reason
    (row,) = found.devices
    assert row.device == "stage 0"
    assert row.fits


@QWEN25
def test_tensor_parallelism_slices_the_layers_and_the_kv_cache_per_rank() -> None:
    whole = plan("qwen2.5-vl-7b", "vllm", "80GiB", 2, workload=LONG, tensor_parallel=1)
    halves = plan("qwen2.5-vl-7b", "vllm", "80GiB", 2, workload=LONG, tensor_parallel=2)
    one, two = whole.devices[0], halves.devices[0]
    # The layers and the vocabulary halve; the tower (data mode), norms and merger do not.
    assert one.weights / 2 < two.weights < 0.6 * one.weights
    # 4 KV heads over 2 ranks: half the cache each.
    assert two.kv_cache == pytest.approx(one.kv_cache / 2, rel=0.01)


@QWEN25
def test_pipeline_stages_cross_hosts_when_one_host_is_not_enough() -> None:
    found = plan("qwen2.5-vl-7b", "vllm", "6GiB", 2, nodes=2, workload=Workload(text_tokens=4096))
    assert found.fits
    assert found.parallel is not None
    assert found.parallel.pipeline_parallel > 1
    assert found.parallel.nodes == 2
    assert len(found.devices) == found.parallel.pipeline_parallel
    stages = set(found.device_map.values())
    assert stages == {f"stage {i}" for i in range(found.parallel.pipeline_parallel)}
    assert found.device_map["lm_head"] == f"stage {found.parallel.pipeline_parallel - 1}"
    launch = found.parallel.launch
    assert launch is not None
    assert [node for node, _ in launch.setup] == [0, 1]  # Ray's head, then the worker
    ((_, argv),) = launch.commands
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"


@QWEN25
def test_refusal_lists_options_each_checked_by_planning_again() -> None:
    import torch

    work = Workload(text_tokens=16384, image_tokens=1280)
    refused = plan("qwen2.5-vl-7b", "sglang", "6GiB", 2, nodes=2, workload=work)
    assert not refused.fits
    assert refused.parallel is not None
    assert refused.parallel.launch is None
    option = next(o for o in refused.options if "nodes" in o.arguments)
    assert option.kind == "gpus"
    assert option.strategy == "parallel"
    with pytest.raises(omnifix.InsufficientMemoryError):
        refused.raise_if_refused()
    more = int(option.arguments["nodes"])
    again = plan("qwen2.5-vl-7b", "sglang", "6GiB", 2, nodes=more, workload=work)
    assert again.fits
    # The option's code is the call that plans it.
    pasted = eval(option.code, {"omnifix": omnifix, "torch": torch})  # noqa: S307 - omnifix's code
    assert pasted.fits
    assert pasted.parallel is not None
    assert pasted.parallel.nodes == again.parallel.nodes


@QWEN25
@pytest.mark.parametrize(
    ("engine", "valid"), [("vllm", (1, 2, 4, 8)), ("sglang", (1, 2, 4)), ("torchrun", (1, 2))]
)
@QWEN25
def test_a_size_that_does_not_split_the_heads_names_the_sizes_that_do(
    engine: str, valid: tuple[int, ...]
) -> None:
    # Qwen2.5-VL-3B: 16 attention heads, 2 KV heads; its tower: 16 heads, a 3420-wide MLP.
    with pytest.raises(InvalidArgumentError, match="tensor_parallel=3") as error:
        plan("qwen2.5-vl-3b", engine, "24GiB", 8, tensor_parallel=3)
    assert error.value.argument == "tensor_parallel"
    assert error.value.valid == valid
    assert ", ".join(map(str, valid)) in str(error.value)


@QWEN25
def test_more_gpus_per_node_than_budgets_is_refused_with_the_counts_that_work() -> None:
    with pytest.raises(InvalidArgumentError, match="gpus_per_node=4") as error:
        plan("qwen2.5-vl-3b", "vllm", "24GiB", 2, gpus_per_node=4)
    assert error.value.valid == (1, 2)


@QWEN25
def test_an_unknown_engine_names_the_engines() -> None:
    with pytest.raises(InvalidArgumentError, match="'vllm', 'sglang', 'torchrun'") as error:
        plan("qwen2.5-vl-3b", "tgi", "24GiB", 2)
    assert error.value.argument == "engine"


@QWEN25
def test_torchrun_has_no_pipeline_stages() -> None:
    with pytest.raises(InvalidArgumentError, match="pipeline_parallel=2"):
        plan("qwen2.5-vl-3b", "torchrun", "24GiB", 2, pipeline_parallel=2)


@QWEN25
@pytest.mark.parametrize(
    ("engine", "count", "options"),
    [
        ("vllm", 4, {"workload": LONG}),
        ("vllm", 2, {"nodes": 2, "workload": Workload(text_tokens=4096)}),
        ("sglang", 4, {"workload": LONG}),
        ("sglang", 2, {"nodes": 2, "workload": Workload(text_tokens=4096)}),
    ],
)
@QWEN25
def test_every_engine_flag_exists_in_the_pinned_release_with_a_valid_value(
    engine: str, count: int, options: dict[str, Any]
) -> None:
    found = plan("qwen2.5-vl-7b", engine, "8GiB", count, **options)
    assert found.parallel is not None
    assert found.parallel.launch is not None
    assert found.parallel.launch.release == engine_flags(engine)["release"]
    for _, argv in found.parallel.launch.commands:
        check_argv(engine, argv)


@QWEN25
def test_vllm_keeps_the_vision_tower_whole_per_gpu_where_that_fits() -> None:
    found = plan("qwen2.5-vl-7b", "vllm", "12GiB", 4, workload=LONG)
    assert found.parallel is not None
    assert found.parallel.launch is not None
    ((_, argv),) = found.parallel.launch.commands
    if found.parallel.encoder == "data":
        assert argv[argv.index("--mm-encoder-tp-mode") + 1] == "data"
    else:
        assert "--mm-encoder-tp-mode" not in argv
    media = json.loads(argv[argv.index("--limit-mm-per-prompt") + 1])
    assert media == {"image": 1, "video": 0}
    assert int(argv[argv.index("--max-model-len") + 1]) == LONG.prompt_tokens + 256


@QWEN25
def test_torchrun_command_parses_with_the_installed_torchrun_and_the_script_compiles() -> None:
    from torch.distributed.run import get_args_parser

    found = plan("qwen2.5-vl-7b", "torchrun", "16GiB", 2, nodes=2, workload=LONG)
    assert found.parallel is not None
    assert found.parallel.launch is not None
    for node, argv in found.parallel.launch.commands:
        parsed = get_args_parser().parse_args(list(argv[1:]))
        assert parsed.nproc_per_node == str(found.parallel.gpus_per_node)
        assert int(parsed.node_rank) == node
        assert parsed.training_script == "run_omnifix.py"
    script = found.parallel.launch.script
    compile(script, "run_omnifix.py", "exec")
    assert "parallel='tensor'" in script
    assert f"workload = {LONG!r}" in script
    assert eval(repr(LONG), {"Workload": Workload}) == LONG  # noqa: S307 - our own repr


@QWEN25
def test_cli_prints_the_launch_and_json_carries_it() -> None:
    args = ["plan", "qwen2.5-vl-7b", "--gpu", "8GiB", "--gpus-per-node", "4", "--engine", "vllm"]
    args += ["--text", "32768", "--image", "1280", "--json"]
    assert main(args) == 0


@QWEN25
def test_cli_json_has_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "qwen2.5-vl-7b", "--gpu", "8GiB", "--gpus-per-node", "4", "--engine", "vllm"]
    args += ["--text", "32768", "--image", "1280"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "parallel"
    assert data["parallel"]["tensor_parallel"] == 4
    (command,) = data["parallel"]["launch"]["commands"]
    check_argv("vllm", tuple(command["argv"]))
    assert main([*args, "--plain"]) == 0
    assert "vllm serve Qwen/Qwen2.5-VL-7B-Instruct --tensor-parallel-size 4" in (
        capsys.readouterr().out
    )


@QWEN25
def test_cli_bad_engine_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "qwen2.5-vl-3b", "--gpu", "24GiB", "--engine", "tgi"]) == 2
    [line] = capsys.readouterr().err.splitlines()  # one line, in the command line's terms
    assert line.startswith("omnifix plan: ")
    assert "--engine 'tgi' was given" in line
    assert "Pass --engine one of those" in line


@QWEN25
def test_json_round_trips() -> None:
    found = plan("qwen2.5-vl-7b", "vllm", "8GiB", 4, workload=LONG)
    data = json.loads(json.dumps(found.to_dict()))
    assert data["parallel"]["engine"] == "vllm"
    assert data["devices"][0]["device"] == "stage 0"


def test_flag_data_names_its_source() -> None:
    for path in FLAGS.glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert data["sources"]
        assert all("repo" in source and "path" in source for source in data["sources"])
        assert isinstance(argparse.Namespace(**data["flags"]), argparse.Namespace)


@QWEN25
def test_a_refusal_without_options_says_what_would_help() -> None:
    refused = plan("qwen2.5-vl-7b", "sglang", "1GiB", 1)
    assert not refused.fits
    assert refused.options == ()
    assert refused.explain().endswith("nor up to 8 times as many hosts or fewer text tokens, fits.")


def test_qwen2_vl_plans_on_every_supported_transformers() -> None:
    # Qwen2-VL-7B (28 heads, 4 KV heads; a tower of 16 heads and a 5120-wide MLP) from 4.45 on.
    found = plan("qwen2-vl-7b", "vllm", "8GiB", 4, workload=LONG)
    assert found.fits
    assert found.parallel is not None
    assert found.parallel.valid_tensor_parallel == (1, 2, 4)
    assert found.parallel.launch is not None
    for _, argv in found.parallel.launch.commands:
        check_argv("vllm", argv)
