"""``omnifix plan``: the planner from the command line, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

import omnifix
import omnifix.testing as ot
from omnifix._cli import main
from omnifix._units import format_bytes

if TYPE_CHECKING:
    import pathlib


def test_fits_on_one_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "qwen2-vl-7b", "--gpu", "24GiB", "--text", "2048", "--image", "1280"]
    assert main([*argv, "--plain"]) == 0
    out = capsys.readouterr().out
    expected = omnifix.plan_placement(
        "qwen2-vl-7b",
        budgets={0: "24GiB"},
        workload=omnifix.Workload(text_tokens=2048, image_tokens=1280),
    )
    assert out == f"{expected}\n"  # the plan once: its reason once
    assert out.count(expected.reason) == 1
    assert " fits" in out


def test_rich_tables_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "qwen2-vl-7b", "--gpu", "12GiB", "--gpu", "12GiB", "--text", "2048"]
    assert main(argv) == 0
    rich_out = capsys.readouterr().out
    assert main([*argv, "--plain"]) == 0
    plain_out = capsys.readouterr().out
    assert rich_out != plain_out
    assert "─" in rich_out  # the rich tables' rule under their column names
    assert "─" not in plain_out
    plan = omnifix.plan_placement(
        "qwen2-vl-7b", budgets={0: "12GiB", 1: "12GiB"}, workload=omnifix.Workload(text_tokens=2048)
    )
    for row in plan.devices:  # every device's numbers are in the table
        assert row.device in rich_out
        assert format_bytes(row.total) in rich_out


def test_does_not_fit_exits_1_with_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "qwen2-vl-7b", "--gpu", "8GiB", "--plain"]) == 1
    out = capsys.readouterr().out
    plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "8GiB"})
    assert "does not fit" in out
    assert out.count("Options that fit") == 1
    assert plan.options
    for option in plan.options:
        assert out.count(option.code) == 1
    assert "cuda:0" in out


def test_split_over_two_gpus_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "qwen2-vl-7b", "--gpu", "12GiB", "--gpu", "12GiB", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["strategy"] == "split"
    assert data["fits"] is True
    assert [row["device"] for row in data["devices"]] == ["cuda:0", "cuda:1"]


def test_workload_options_reach_the_planner(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "qwen2-vl-7b", "--gpu", "400GiB", "--json", "--dtype", "float16"]
    argv += ["--attn", "eager", "--video", "10", "--image", "256", "--batch", "2", "--new", "64"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dtype"] == "float16"
    assert data["attn_implementation"] == "eager"
    assert data["workload"] == {
        **data["workload"],
        "video_seconds": 10.0,
        "image_tokens": 256,
        "batch_size": 2,
        "max_new_tokens": 64,
    }


def test_allow_offload(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "qwen2-vl-7b", "--gpu", "8GiB", "--cpu", "64GiB", "--allow-offload", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "offload"
    assert "cpu" in data["device_map"].values()


def test_local_checkpoint_and_config(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ot.save_tiny_model("qwen2", tmp_path)
    assert main(["plan", str(path), "--gpu", "1GiB", "--json"]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    assert main(["plan", str(path / "config.json"), "--gpu", "1GiB", "--json"]) == 0
    by_file = json.loads(capsys.readouterr().out)
    assert by_dir["device_map"] == by_file["device_map"] == {"": "cuda:0"}


def test_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "no-such-model", "--gpu", "8GiB"]) == 2
    assert "No built-in preset named 'no-such-model'" in capsys.readouterr().err
    for bad in (["--gpu", "lots"], ["--text", "-1"], ["--text", "many"]):  # tests/test_cli.py
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "qwen2-vl-7b", "--gpu", "8GiB", *bad])
        assert exit_info.value.code == 2


@pytest.mark.skipif(
    "qwen2.5-vl" not in ot.available_families(), reason="Qwen2.5-VL needs transformers 4.49+"
)
def test_module_entry_point_json() -> None:
    command = [sys.executable, "-m", "omnifix", "plan", "qwen2.5-vl-7b", "--gpu", "24GiB", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)  # noqa: S603
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["model"] == "qwen2.5-vl-7b"
    assert data["fits"] is True
    assert data["device_map"] == {"": "cuda:0"}


def test_dtypes_table_per_device_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "qwen2-vl-7b", "--gpu", "12GiB", "--text", "4096", "--dtypes"]
    assert main([*argv, "--plain"]) == 0  # int8 and nf4 fit
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(lines) == {"float32", "bfloat16", "int8", "nf4"}
    assert lines["float32"].split()[-1] == "refused"
    assert lines["nf4"].split()[-1] == "single"
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {row["label"]: row for row in data["dtypes"]}
    work = omnifix.Workload(text_tokens=4096)
    for label, dtype, quantization in (
        ("float32", "float32", None),
        ("bfloat16", "bfloat16", None),
        ("int8", "bfloat16", "int8"),
        ("nf4", "bfloat16", "nf4"),
    ):
        plan = omnifix.plan_placement(
            "qwen2-vl-7b",
            budgets={0: "12GiB"},
            dtype=dtype,
            quantization=quantization,
            workload=work,
        )
        row = rows[label]
        assert (row["dtype"], row["fits"]) == (dtype, plan.fits)
        assert row["devices"][0]["weights"] == plan.devices[0].weights
        assert row["devices"][0]["peak"] == plan.devices[0].total
        assert format_bytes(plan.devices[0].weights) in lines[label]
    assert main(["plan", "qwen2-vl-7b", "--gpu", "2GiB", "--dtypes", "--plain"]) == 1  # none fits


def test_quantization_flag(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "qwen2-vl-7b", "--gpu", "8GiB", "--quantization", "nf4", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    lm_head, tower = data["quantization_config"]["llm_int8_skip_modules"]
    assert (lm_head, tower.rpartition(".")[2]) == ("lm_head", "visual")


def test_accept_bound_flag(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    config_class = getattr(transformers, "Qwen3NextConfig", None)
    if config_class is None:
        pytest.skip("no Qwen3-Next (linear attention) in this transformers")
    config_class(num_hidden_layers=4, vocab_size=1024).save_pretrained(tmp_path)
    argv = ["plan", str(tmp_path), "--gpu", "80GiB", "--plain"]
    assert main(argv) == 1  # linear-attention layers: sized only by a bound, refused by default
    assert "accept_bound=True" in capsys.readouterr().out  # the option, as Python to paste
    assert main([*argv, "--accept-bound"]) == 0
