"""``omnifix demo``: a tiny model through load_safely on this machine, with its placement report."""

from __future__ import annotations

import subprocess
import sys

import pytest

import omnifix
import omnifix.testing as ot
from omnifix._cli import main


@pytest.mark.parametrize("family", ot.available_families())
def test_demo_loads_generates_and_reports(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--family", family, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert f"tiny {family}" in out
    assert "loaded with load_safely" in out
    assert "generated              3 tokens on cpu" in out
    assert str(omnifix.normalize_device("auto")) in out
    assert "single" in out  # the report's strategy: the tiny model fits one device


def test_demo_refuses_a_device_this_machine_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnifix demo: 'cuda' is not available")
    assert "Pass 'auto'" in err


def test_python_dash_m_omnifix_demo_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omnifix", "demo"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded with load_safely" in result.stdout
    assert "Traceback" not in result.stderr


def test_the_demo_families_are_those_of_omnifix_testing() -> None:
    from omnifix._cli import DEMO_FAMILIES

    assert DEMO_FAMILIES == ot.FAMILIES


def _imports_omnifix_testing(*argv: str) -> bool:
    """Whether ``omnifix ARGV`` (run in a fresh interpreter) imported ``omnifix.testing``."""
    code = (
        "import sys\n"
        "from omnifix._cli import main\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('omnifix.testing' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run(  # noqa: S603  # our own interpreter running our own code
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    verdict = result.stderr.strip().splitlines()[-1]
    assert verdict in {"True", "False"}, result.stderr
    return verdict == "True"


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        ("plan", "--help"),
        ("plan", "qwen2-vl-7b", "--gpu", "24GiB", "--json"),
        ("doctor", "--json"),
        ("demo", "--help"),
    ],
)
def test_only_running_the_demo_imports_omnifix_testing(argv: tuple[str, ...]) -> None:
    assert not _imports_omnifix_testing(*argv)


def test_the_demo_imports_omnifix_testing() -> None:
    assert _imports_omnifix_testing("demo", "--family", "qwen2", "--max-new-tokens", "1")
