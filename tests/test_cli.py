"""The ``omnifix`` command line as users meet it: help, version, flags, errors, layout, progress."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest

import omnifix
from omnifix._cli import main
from omnifix._plan.presets import PRESETS

WIDTHS = (60, 80, 100, 160)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "--version") == (0, f"omnifix {omnifix.__version__}\n", "")


def test_help_shows_defaults_presets_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, top, _ = _run(capsys, "--help")
    assert code == 0
    assert "``" not in top  # no reStructuredText markup
    for command in ("doctor", "plan", "demo"):
        assert command in top
    assert "examples:" in top
    code, plan, _ = _run(capsys, "plan", "--help")
    assert code == 0
    for preset in PRESETS:
        assert preset in plan
    for default in ("text tokens (default: 512)", "to generate (default: 256)", "(default: 1)"):
        assert default in " ".join(plan.split())
    assert "examples:" in plan
    assert "omnifix plan qwen2.5-vl-7b --gpu 24GiB" in plan
    _, demo, _ = _run(capsys, "demo", "--help")
    assert "(default: qwen2-vl)" in " ".join(demo.split())


def test_flags_follow_hf_mem_and_accelerate_and_old_names_still_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, help_text, _ = _run(capsys, "plan", "--help")
    assert "--batch-size" in help_text
    assert "--max-new-tokens" in help_text
    assert not re.search(r"--batch\b(?!-)", help_text)  # the old names are hidden
    assert not re.search(r"--new\b", help_text)
    new = ["plan", "qwen2-vl-7b", "--gpu", "80GiB", "--json", "--batch-size", "3"]
    code, out, _ = _run(capsys, *new, "--max-new-tokens", "7")
    assert code == 0
    old = ["plan", "qwen2-vl-7b", "--gpu", "80GiB", "--json", "--batch", "3", "--new", "7"]
    assert _run(capsys, *old) == (0, out, "")
    workload = json.loads(out)["workload"]
    assert (workload["batch_size"], workload["max_new_tokens"]) == (3, 7)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--gpu", "24"), "omnifix plan: --gpu '24': a number without a unit is ambiguous; "),
        (("--gpu", "24"), "pass a size such as 24GiB"),
        (("--gpu", "lots"), "omnifix plan: --gpu 'lots': not a memory size"),
        (("--cpu=-1GiB",), "omnifix plan: --cpu '-1GiB'"),
        (("--dtype", "int8"), "omnifix plan: --dtype 'int8': int8 is a quantisation, not a dtype"),
        (("--dtype", "int8"), "quantization_config"),
        (("--dtype", "float64"), "pass one of auto, bfloat16, float16, float32"),
        (("--text", "many"), "omnifix plan: --text 'many': pass a whole number"),
        (("--text", "-1"), "omnifix plan: --text '-1'"),
        (("--video", "nan"), "omnifix plan: --video 'nan': pass seconds"),
        (("--attn", "foo"), "omnifix plan: --attn 'foo' is not an attention implementation"),
    ],
)
def test_errors_name_the_flag_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], expected: str
) -> None:
    code, out, err = _run(capsys, "plan", "qwen2-vl-7b", "--gpu", "8GiB", *argv)
    assert code == 2
    assert out == ""
    assert expected in err
    assert "Traceback" not in err
    assert "budgets[" not in err
    assert "attn_implementation" not in err


def test_library_errors_are_phrased_with_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "plan", "qwen2-audio-7b", "--gpu", "80GiB", "--image", "20")
    assert code == 2
    assert err.startswith("omnifix plan: ")
    assert "--image" in err
    assert "image_tokens" not in err
    code, _, err = _run(capsys, "plan", "no-such-model")
    assert code == 2
    assert "qwen2-vl-7b" in err  # the presets it knows


def _words(text: str) -> list[str]:
    return re.sub(r"[─━│┃]+", " ", text).split()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("argv", [(), ("plan",), ("demo",), ("doctor",)])
def test_help_never_breaks_a_word(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    width: int,
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    _, wide, _ = _run(capsys, *argv, "--help")
    monkeypatch.setenv("COLUMNS", str(width))
    _, narrow, _ = _run(capsys, *argv, "--help")
    assert _words(narrow) == _words(wide)  # the same words, wrapped only between them
    assert max(map(len, narrow.splitlines())) <= width


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(
    "argv",
    [
        # refused, with options; a fixed --cpu, since free host memory changes between two runs
        ("plan", "qwen2-vl-7b", "--gpu", "8GiB", "--cpu", "64GiB"),
        ("plan", "qwen2-vl-7b", "--gpu", "12GiB", "--gpu", "12GiB"),  # split
        ("doctor",),
    ],
)
def test_output_never_breaks_a_word_and_says_each_fact_once(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    width: int,
) -> None:
    _, plain, _ = _run(capsys, *argv, "--plain")
    monkeypatch.setenv("COLUMNS", str(width))
    _, table, _ = _run(capsys, *argv)
    assert set(_words(table)) <= set(_words(plain))  # a word cut in two is not in the plain text
    for marker in ("why:", "Options that fit", "Fix:", "findings"):
        assert table.count(marker) == plain.count(marker) <= 1


def test_progress_on_a_terminal_and_nothing_when_piped(tmp_path: os.PathLike[str]) -> None:
    command = [sys.executable, "-m", "omnifix", "plan", "qwen2-vl-7b", "--gpu", "24GiB", "--json"]
    piped = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)  # noqa: S603
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # scripts and logs get the JSON only
    leader, follower = pty.openpty()
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower) as process:  # noqa: S603
            stdout, _ = process.communicate(timeout=300)
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: everything is read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert process.returncode == 0
    assert json.loads(stdout)["fits"] is True  # stdout untouched
    text = seen.decode()
    assert "planning qwen2-vl-7b" in text
    assert text.endswith("\r\x1b[2K")  # the line erased at the end


def test_demo_json_is_structured(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "demo", "--family", "qwen2", "--max-new-tokens", "2", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["family"] == "qwen2"
    assert data["generated_tokens"] == 2
    assert data["input_device"] == str(omnifix.normalize_device("auto"))
    assert data["parameters"] > 0
    assert data["placement"]["strategy"] == "single"
