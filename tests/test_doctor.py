"""``omnifix doctor``: the real run on this machine, and GPUs simulated through torch's own probes.

Machines are simulated the way tests/test_devices.py does it: torch's probes
(``torch.cuda.is_available``, ``device_count``, ``get_device_properties``,
``get_device_capability``, ``mem_get_info``, ``torch.version``) are patched, never omnifix.
Installed versions are simulated by ``importlib.metadata.version``, and omnifix's own
requirements by ``importlib.metadata.requires`` (so no test depends on the floors it declares).
flash-attn is a module in ``sys.modules`` (or a finder that fails the way a flash-attn built for
another torch does); transformers' ``is_flash_attn_2_available`` is asked for its answer only for
a simulated flash-attn that imports, which it cannot see (it reads distribution metadata, and
caches its answer in 5.x).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import io
import json
import os
import re
import shlex
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest import mock

import accelerate
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.version import Version

from omnifix._cli import main
from omnifix._doctor import Diagnosis, diagnose, render_rich, render_text

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

GIB = 1024**3
H100 = ("NVIDIA H100 80GB HBM3", (9, 0), 79 * GIB)
A100 = ("NVIDIA A100-SXM4-40GB", (8, 0), 40 * GIB)
T4 = ("Tesla T4", (7, 5), 15 * GIB)
MI300X = ("AMD Instinct MI300X", (9, 4), 192 * GIB)
#: What the simulated machines' omnifix declares (its metadata's ``Requires-Dist``).
DECLARED = (
    "torch>=2.6",
    "packaging>=20",
    "transformers>=4.45",
    "accelerate>=1.0",
    "rich>=13",
    "flash-attn>=2.6; extra == 'flash'",
)
REQUIRED = {Requirement(line).name: str(Requirement(line).specifier) for line in DECLARED[:-1]}


@dataclass(frozen=True)
class FakeGpu:
    name: str
    capability: tuple[int, int]
    total: int
    free: int | None = None  # None: all free; raise when "error"
    broken: bool = False  # mem_get_info raises, as for a GPU in exclusive use


def gpu(spec: tuple[str, tuple[int, int], int], **kwargs: Any) -> FakeGpu:
    return FakeGpu(*spec, **kwargs)


ABSENT: Any = object()  # for modules(): no entry at all, so the import machinery runs


class _FailingFinder(importlib.abc.MetaPathFinder):
    """Fails ``import flash_attn`` the way a build for another torch does."""

    def find_spec(self, name: str, *_: Any) -> None:
        if name == "flash_attn":
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")


@contextlib.contextmanager
def modules(replacements: dict[str, Any]) -> Iterator[None]:
    """Set these ``sys.modules`` entries (None blocks an import), restoring only them after.

    (``mock.patch.dict(sys.modules)`` would also drop every module first imported inside.)
    """
    saved = {name: sys.modules.get(name, ABSENT) for name in replacements}
    try:
        for name, value in replacements.items():
            sys.modules.pop(name, None)
            if value is not ABSENT:
                sys.modules[name] = value
        yield
    finally:
        for name, value in saved.items():
            sys.modules.pop(name, None)
            if value is not ABSENT:
                sys.modules[name] = value


@contextlib.contextmanager
def distributions(versions: dict[str, str | None]) -> Iterator[None]:
    """``importlib.metadata.version`` answers these (None: not installed), the truth otherwise."""
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name not in versions:
            return real(name)
        found = versions[name]
        if found is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return found

    with mock.patch.object(importlib.metadata, "version", version):
        yield


@contextlib.contextmanager
def declared(lines: Sequence[str] | None) -> Iterator[None]:
    """``importlib.metadata.requires("omnifix")`` gives ``lines`` (None: omnifix not installed)."""
    real = importlib.metadata.requires

    def requires(name: str) -> list[str] | None:
        if name != "omnifix":
            return real(name)
        if lines is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return list(lines)

    with mock.patch.object(importlib.metadata, "requires", requires):
        yield


@contextlib.contextmanager
def flash_attn(flash: str | None, *, transformers_accepts: bool) -> Iterator[None]:
    """None: not installed; a version: imports; "broken": installed, fails to import."""
    with contextlib.ExitStack() as stack:
        if flash == "broken":
            finder = _FailingFinder()
            sys.meta_path.insert(0, finder)
            stack.callback(sys.meta_path.remove, finder)
            stack.enter_context(modules({"flash_attn": ABSENT}))
            stack.enter_context(distributions({"flash-attn": "2.7.4"}))
        elif flash is None:
            stack.enter_context(modules({"flash_attn": None}))
            stack.enter_context(distributions({"flash-attn": None}))
        else:
            module = types.ModuleType("flash_attn")
            module.__version__ = flash  # type: ignore[attr-defined]
            stack.enter_context(modules({"flash_attn": module}))
            stack.enter_context(distributions({"flash-attn": flash}))
            accepts = mock.patch.object(
                transformers.utils, "is_flash_attn_2_available", return_value=transformers_accepts
            )
            stack.enter_context(accepts)
        yield


@dataclass
class FakeCuda:
    """torch.cuda's probes for a machine with these GPUs."""

    gpus: Sequence[FakeGpu]
    init_warning: str | None = None

    def is_available(self) -> bool:
        if self.init_warning:
            warnings.warn(self.init_warning, UserWarning, stacklevel=2)
        return bool(self.gpus)

    def device_count(self) -> int:
        return len(self.gpus)

    def get_device_properties(self, index: int) -> Any:
        fake = self.gpus[index]
        major, minor = fake.capability
        return types.SimpleNamespace(
            name=fake.name, total_memory=fake.total, major=major, minor=minor
        )

    def get_device_capability(self, index: int) -> tuple[int, int]:
        return self.gpus[index].capability

    def mem_get_info(self, index: int) -> tuple[int, int]:
        fake = self.gpus[index]
        if fake.broken:
            raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")
        return (fake.total if fake.free is None else fake.free), fake.total


@contextlib.contextmanager
def machine(
    gpus: Sequence[FakeGpu] = (),
    *,
    cuda: str | None = "12.8",
    hip: str | None = None,
    flash: str | None = None,
    transformers_flash: bool = True,  # what transformers' is_flash_attn_2_available() says
    versions: dict[str, str | None] | None = None,  # distribution -> version, None: missing
    requires: Sequence[str] | None = DECLARED,  # what omnifix declares; None: not installed
    init_warning: str | None = None,
) -> Iterator[None]:
    """Make torch describe a machine with these GPUs (and no mps, xpu or npu)."""
    fake = FakeCuda(gpus, init_warning)
    with contextlib.ExitStack() as stack:

        def patch(target: Any, name: str, value: Any) -> None:
            stack.enter_context(mock.patch.object(target, name, value))

        for probe in (
            "is_available",
            "device_count",
            "get_device_properties",
            "get_device_capability",
            "mem_get_info",
        ):
            patch(torch.cuda, probe, getattr(fake, probe))
        patch(torch.cuda, "current_device", lambda: 0)
        patch(torch.accelerator, "is_available", lambda: bool(gpus))
        patch(torch.accelerator, "current_accelerator", lambda *_: torch.device("cuda"))
        patch(torch.accelerator, "current_device_index", lambda: 0)
        patch(torch.version, "cuda", cuda)
        patch(torch.version, "hip", hip)
        patch(torch.backends.mps, "is_available", lambda: False)
        if hasattr(torch, "xpu"):
            patch(torch.xpu, "is_available", lambda: False)
        stack.enter_context(modules({"torch_npu": None}))
        stack.enter_context(flash_attn(flash, transformers_accepts=transformers_flash))
        stack.enter_context(distributions(versions or {}))
        stack.enter_context(declared(requires))
        yield


@pytest.fixture(autouse=True)
def _environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU-selecting variables are unset unless a test sets them (GPU tests keep them)."""
    if request.node.get_closest_marker("gpu"):
        return
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def levels(diagnosis: Diagnosis) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"ok": [], "warn": [], "error": []}
    for finding in diagnosis.findings:
        found[finding.level].append(finding.message)
    return found


def attention(diagnosis: Diagnosis) -> dict[str, tuple[bool, str]]:
    return {backend.name: (backend.usable, backend.detail) for backend in diagnosis.attention}


# ---------------------------------------------------------------------------------------------
# The real machine
# ---------------------------------------------------------------------------------------------

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def declared_here() -> dict[str, str]:
    """What this install of omnifix requires, straight from its metadata."""
    lines = importlib.metadata.requires("omnifix") or []
    return {
        Requirement(line).name: str(Requirement(line).specifier)
        for line in lines
        if Requirement(line).marker is None
    }


@needs_no_gpu
def test_real_run_without_gpu_says_so_and_exits_0() -> None:
    report = diagnose()
    assert report.gpus == ()
    assert report.exit_code == 0, report.errors
    assert report.devices[-1] == "cpu"
    assert report.auto_device == "cpu"
    found = {package.name: package.version for package in report.versions}
    assert found["torch"] == str(Version(importlib.metadata.version("torch")))
    assert found["transformers"] == str(Version(transformers.__version__))
    assert found["accelerate"] == str(Version(accelerate.__version__))
    required = {p.name: p.required for p in report.versions if p.required is not None}
    assert required == declared_here()
    assert any("No GPU" in message for message in levels(report)["ok"])
    usable = attention(report)
    assert usable["eager"][0]
    assert usable["sdpa"][0]
    assert usable["flash_attention_2"] == (False, "it runs on CUDA GPUs only, and torch sees none")


@needs_no_gpu
def test_json_from_a_subprocess_parses_and_exits_0() -> None:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"}
    }
    result = subprocess.run(
        [sys.executable, "-m", "omnifix", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    assert data["exit_code"] == 0
    assert data["errors"] == 0
    assert data["gpus"] == []
    assert data["devices"][-1] == "cpu"
    torch_entry = next(entry for entry in data["versions"] if entry["name"] == "torch")
    assert torch_entry["version"] == str(Version(importlib.metadata.version("torch")))
    assert torch_entry["required"] == declared_here()["torch"]
    assert [entry["name"] for entry in data["attention"]] == [
        "eager",
        "sdpa",
        "flash_attention_2",
    ]


def test_plain_text_when_rich_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    with machine(cuda=None), modules({"rich": None, "rich.console": None}):
        code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 0
    for heading in ("versions", "attention backends", "findings"):
        assert f"\n{heading}\n" in out
    assert "\nGPUs (CUDA_VISIBLE_DEVICES unset; devices: cpu; 'auto' is cpu)\nnone\n" in out
    assert "─" not in out  # no rich table
    # No fix column: an ok finding is its sentence alone.
    assert "\nlevel  finding\nok     No GPU: torch " in out
    assert "Fix:" not in out
    assert out.rstrip().endswith("Nothing to fix.")


def test_rich_tables_when_rich_is_installed(capsys: pytest.CaptureFixture[str]) -> None:
    with machine([gpu(H100)], flash="2.8.3"):
        code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 0
    assert "─" in out  # a rich table's head rule, not the plain layout
    assert "NVIDIA H100 80GB HBM3" in out
    assert "flash-attn 2.8.3 on cuda:0" in out


def test_plain_and_rich_print_the_same_cells() -> None:
    from rich.console import Console

    gpus = [gpu(A100, free=2 * GIB), gpu(T4)]
    with machine(gpus, flash="2.8.3", versions={"accelerate": None}):
        report = diagnose()
    console = Console(file=io.StringIO(), width=400, color_system=None)
    render_rich(report, console)
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    text = render_text(report)
    assert report.errors
    assert report.warnings
    for finding in report.findings:
        cell = f"{finding.message} Fix: {finding.fix}" if finding.fix else finding.message
        assert cell in text
        assert cell in shown
    for cell in ("2.0 GiB / 40.0 GiB", "7.5", "not installed", ">=1.0", "optional"):
        assert cell in text
        assert cell in shown


def test_rich_escapes_text_that_looks_like_markup() -> None:
    from rich.console import Console

    with machine([gpu(("GPU [bold]x[/bold]", (9, 0), 80 * GIB))]):
        report = diagnose()
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render_rich(report, console)
    assert "GPU [bold]x[/bold]" in console.file.getvalue()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Simulated machines
# ---------------------------------------------------------------------------------------------


def test_two_hoppers_with_flash_attn_report_every_fact() -> None:
    with machine([gpu(H100, free=70 * GIB), gpu(H100)], flash="2.8.3"):
        report = diagnose()
        code = main(["doctor", "--json"])
    assert code == 0
    assert report.exit_code == 0
    assert [(g.index, g.name, g.capability, g.bf16) for g in report.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", (9, 0), True),
        (1, "NVIDIA H100 80GB HBM3", (9, 0), True),
    ]
    assert [(g.free_bytes, g.total_bytes) for g in report.gpus] == [
        (70 * GIB, 79 * GIB),
        (79 * GIB, 79 * GIB),
    ]
    assert report.devices == ("cuda:0", "cuda:1", "cpu")
    assert report.auto_device == "cuda:0"
    torch_version = next(p for p in report.versions if p.name == "torch")
    assert torch_version.note == "CUDA 12.8 build"
    assert attention(report)["flash_attention_2"] == (
        True,
        "flash-attn 2.8.3 on cuda:0, cuda:1, in float16 or bfloat16",
    )
    text = render_text(report)
    assert "cuda:0  NVIDIA H100 80GB HBM3  70.0 GiB / 79.0 GiB  9.0      yes" in text
    assert re.search(r"^flash-attn +2\.8\.3 +optional$", text, re.MULTILINE)


@pytest.mark.parametrize(
    ("gpus", "flash", "transformers_flash", "reason"),
    [
        ([gpu(T4)], "2.8.3", True, "needs compute capability 8.0 (Ampere) or newer"),
        ([gpu(H100)], None, True, "flash-attn is not installed: pip install flash-attn"),
        ([gpu(H100)], "broken", True, "undefined symbol"),
        ([gpu(H100)], "2.0.1", False, "refuses flash-attn 2.0.1"),
    ],
)
def test_flash_attention_says_why_it_cannot_run(gpus, flash, transformers_flash, reason) -> None:
    with machine(gpus, flash=flash, transformers_flash=transformers_flash):
        report = diagnose()
    usable, detail = attention(report)["flash_attention_2"]
    assert not usable
    assert reason in detail
    assert attention(report)["sdpa"][0]
    assert report.exit_code == 0  # sdpa still works: nothing is broken


@pytest.mark.parametrize(
    ("spec", "cuda", "hip", "bf16", "build"),
    [
        (T4, "12.8", None, False, "CUDA 12.8 build"),
        (H100, "12.8", None, True, "CUDA 12.8 build"),
        (MI300X, None, "6.2.41133", True, "ROCm 6.2.41133 build"),
    ],
)
def test_bf16_follows_the_gpu_and_the_torch_build(spec, cuda, hip, bf16, build) -> None:
    with machine([gpu(spec)], cuda=cuda, hip=hip):
        report = diagnose()
    assert report.gpus[0].bf16 is bf16
    assert report.gpus[0].capability == spec[1]
    assert next(p for p in report.versions if p.name == "torch").note == build


def test_flash_attn_that_does_not_import_is_a_warning_with_the_fix() -> None:
    with machine([gpu(H100)], flash="broken"):
        report = diagnose()
    flash = next(package for package in report.versions if package.name == "flash-attn")
    assert flash.version == "2.7.4"
    assert "undefined symbol" in flash.note
    [warning] = report.warnings
    assert warning.message.startswith("flash-attn 2.7.4 is installed but does not import")
    assert warning.message.endswith("SetDeviceEi.")  # a sentence, before its "Fix:"
    command = shlex.split(warning.fix.split(" (or ")[0])
    assert command[:3] == ["pip", "install", "--force-reinstall"]
    assert {"--no-build-isolation", "--no-cache-dir"} <= set(command)
    assert command[-1] == "flash-attn"
    assert report.exit_code == 0


def test_mixed_generations_warn_and_name_the_gpus_to_keep(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    with machine([gpu(A100), gpu(T4), gpu(A100)], flash="2.8.3"):
        report = diagnose()
    warned = levels(report)["warn"]
    assert any(
        message.startswith("cuda:1 (Tesla T4, 7.5) is older than Ampere") for message in warned
    )
    assert any("CUDA_VISIBLE_DEVICES=3,6" in finding.fix for finding in report.warnings)
    assert any("CUDA_DEVICE_ORDER" in message for message in warned)
    assert attention(report)["flash_attention_2"][1].endswith(
        "on cuda:0, cuda:2, in float16 or bfloat16"
    )
    assert report.exit_code == 0
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    with machine([gpu(A100), gpu(T4), gpu(A100)]):
        assert not any("CUDA_DEVICE_ORDER" in m for m in levels(diagnose())["warn"])


@pytest.mark.parametrize(
    ("visible", "count", "level", "text"),
    [
        ("0,1,2", 2, "error", "names 3 GPU(s), but torch sees 2"),
        ("GPU-8f6c1b2e,GPU-1a2b3c4d", 1, "error", "names 2 GPU(s), but torch sees 1"),
        ("0,1", 2, "ok", "torch sees the 2 GPU(s) named"),
        ("1,-1,7", 1, "ok", "torch sees the 1 GPU(s) named"),  # CUDA stops at -1
        ("", 0, "warn", "hides every GPU"),
        ("-1", 0, "warn", "hides every GPU"),
    ],
)
def test_cuda_visible_devices_is_checked_against_what_torch_sees(
    monkeypatch, visible, count, level, text
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with machine([gpu(H100)] * count):
        report = diagnose()
        code = main(["doctor", "--json"])
    assert any(text in message for message in levels(report)[level])
    assert report.exit_code == code == (1 if level == "error" else 0)


def test_gpus_named_for_a_cpu_build_of_torch_say_to_install_a_cuda_build(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with machine([], cuda=None):
        report = diagnose()
    [error] = report.errors
    assert "torch is a CPU-only build" in error.message
    assert error.fix == "Install a CUDA build of torch (pytorch.org lists the pip command)."


def test_full_busy_and_unqueryable_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    gpus = [gpu(H100, free=0), gpu(H100, free=4 * GIB), gpu(H100, broken=True), gpu(H100)]
    with machine(gpus):
        report = diagnose()
        code = main(["doctor", "--plain"])
    out = capsys.readouterr().out
    assert code == report.exit_code == 1
    errors = [finding.message for finding in report.errors]
    assert errors == [
        (
            "cuda:2 (NVIDIA H100 80GB HBM3) cannot be used: torch.cuda.mem_get_info failed with "
            "'CUDA error: all CUDA-capable devices are busy or unavailable'."
        ),
        "cuda:0 (NVIDIA H100 80GB HBM3) has 0 B free of 79.0 GiB: nothing can be loaded on it.",
    ]
    [busy] = report.warnings
    assert busy.message.startswith(
        "cuda:1 (NVIDIA H100 80GB HBM3) has only 4.0 GiB free of 79.0 GiB"
    )
    assert report.gpus[2].free_bytes is None
    assert "cuda:2  NVIDIA H100 80GB HBM3  ? / 79.0 GiB" in out
    assert "nothing can be loaded on it. Fix: Stop the processes holding it" in out
    assert "2 error(s), 1 warning(s): broken (exit 1)." in out


def test_a_cuda_build_that_sees_no_gpu_passes_on_torchs_warning() -> None:
    warning = (
        "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040)."
    )
    with machine([], init_warning=warning):
        report = diagnose()
    warned = levels(report)["warn"]
    assert f"torch warned while looking for GPUs: {warning}" in warned
    assert any(message.endswith("(CUDA 12.8 build) sees no GPU.") for message in warned)
    assert report.exit_code == 0


@pytest.mark.parametrize("package", sorted(REQUIRED))
@pytest.mark.parametrize("installed", ["0.9", None])
def test_old_or_missing_required_packages_are_errors(package, installed) -> None:
    with machine(versions={package: installed}):
        report = diagnose()
        code = main(["doctor", "--json"])
    assert code == report.exit_code == 1
    [error] = report.errors
    wanted = f"{package}{REQUIRED[package]}"
    state = "is not installed" if installed is None else "0.9 does not meet it"
    assert error.message == f"omnifix needs {wanted}; {package} {state}."
    # The fix is a command to paste into a shell: pip install of the requirement.
    assert shlex.split(error.fix) == ["pip", "install", wanted]


def test_requirements_are_omnifix_own_metadata() -> None:
    with machine(versions={"transformers": "5.0.0rc1"}, requires=["torch>=99", "accelerate<1"]):
        report = diagnose()
    assert [(p.name, p.required) for p in report.versions] == [
        ("torch", ">=99"),
        ("accelerate", "<1"),
        ("huggingface_hub", None),
        ("tokenizers", None),
        ("safetensors", None),
        ("flash-attn", None),
    ]
    assert [shlex.split(error.fix)[-1] for error in report.errors] == ["torch>=99", "accelerate<1"]
    with machine(versions={"transformers": "5.0.0rc1"}):
        assert diagnose().exit_code == 0  # a pre-release meets the requirement of its release
    with machine(requires=None):
        [error] = diagnose().errors
    assert error.message.startswith("omnifix's metadata is not installed")


@pytest.mark.parametrize("package", ["transformers", "accelerate"])
def test_a_required_package_that_does_not_import_is_an_error(package) -> None:
    with machine(), modules({package: None}):
        report = diagnose()
    [error] = report.errors
    installed = str(Version(importlib.metadata.version(package)))
    assert error.message.startswith(f"{package} {installed} is installed but does not import")
    command = ["pip", "install", "--force-reinstall", "--no-deps", f"{package}=={installed}"]
    assert shlex.split(error.fix) == command


def test_a_torch_that_does_not_import_is_reported_not_raised() -> None:
    with declared(DECLARED), modules({"torch": None}):  # what a broken install looks like
        report = diagnose()
    [error] = report.errors
    assert "torch" in error.message
    assert "is installed but does not import: ModuleNotFoundError" in error.message
    assert error.fix.startswith("Reinstall torch")
    assert report.exit_code == 1
    assert (report.gpus, report.devices) == ((), ("cpu",))
    assert "does not import" in render_text(report)


# ---------------------------------------------------------------------------------------------
# Any machine
# ---------------------------------------------------------------------------------------------

fake_gpus = st.builds(
    FakeGpu,
    name=st.sampled_from(["NVIDIA H100", "Tesla T4", "NVIDIA A10G", "Tesla V100"]),
    capability=st.sampled_from([(7, 0), (7, 5), (8, 0), (8, 6), (9, 0), (10, 0)]),
    total=st.integers(GIB, 200 * GIB),
    free=st.none() | st.integers(0, GIB),
    broken=st.booleans(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpus=st.lists(fake_gpus, max_size=4),
    flash=st.sampled_from([None, "2.8.3", "broken"]),
    visible=st.none() | st.lists(st.sampled_from(["0", "1", "2", "-1", "GPU-a1"]), max_size=4),
)
def test_any_machine_gives_a_consistent_report(gpus, flash, visible) -> None:
    environment = {} if visible is None else {"CUDA_VISIBLE_DEVICES": ",".join(visible)}
    with mock.patch.dict(os.environ, environment), machine(gpus, flash=flash):
        report = diagnose()
    assert len(report.gpus) == len(gpus)
    assert report.exit_code == (1 if report.errors else 0)
    broken = any(fake.broken for fake in gpus)
    full = any(fake.free is not None and fake.free < 256 * 1024**2 for fake in gpus)
    if broken or full:
        assert report.exit_code == 1
    for fake, seen in zip(gpus, report.gpus, strict=True):
        assert seen.bf16 == (fake.capability >= (8, 0))
        assert (seen.free_bytes is None) == fake.broken
    ampere = any(fake.capability >= (8, 0) for fake in gpus)
    assert attention(report)["flash_attention_2"][0] == (ampere and flash == "2.8.3")
    text = render_text(report)
    assert all(fake.name in text for fake in gpus)
    assert all(finding.message in text for finding in report.findings)
    assert json.loads(json.dumps(report.to_dict()))["exit_code"] == report.exit_code


def _flash_lines(report: Diagnosis) -> list[str]:
    return [
        f.message
        for f in report.findings
        if f.message.startswith("cuda:") and ("flash-attn" in f.message or "flash_att" in f.message)
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_flash_attention_on_a_machine_without_gpus_says_sdpa_is_used() -> None:
    # Nothing simulated: this machine's torch and transformers answer.
    report = diagnose()
    [finding] = [f for f in report.findings if f.message.startswith("flash_attention_2")]
    assert finding.level == "ok"
    assert "models load with sdpa" in finding.message
    assert finding.message in render_text(report)


@pytest.mark.skipif(
    transformers.utils.is_flash_attn_2_available(), reason="flash-attn is installed here"
)
def test_flash_attention_findings_name_each_gpu_and_what_loads_use() -> None:
    # The GPUs are simulated; whether flash-attn is available is transformers' real answer.
    with machine([gpu(H100), gpu(T4)]):
        report = diagnose()
    h100, t4 = _flash_lines(report)
    assert h100.startswith("cuda:0 (NVIDIA H100 80GB HBM3, compute capability 9.0)")
    assert "not installed" in h100
    assert "pip install flash-attn --no-build-isolation" in h100
    assert t4.startswith("cuda:1 (Tesla T4, compute capability 7.5): flash-attn needs 8.0")
    assert t4.endswith("models load with sdpa there.")
    assert not [w for w in report.warnings if "flash-attn" in w.message]


def test_flash_attention_that_transformers_refuses_is_a_warning_per_gpu() -> None:
    with machine([gpu(A100)], flash="2.0.0", transformers_flash=False):
        report = diagnose()
    [warning] = [w for w in report.warnings if "flash-attn" in w.message]
    assert warning.message.startswith("cuda:0 (NVIDIA A100-SXM4-40GB, compute capability 8.0)")
    assert "refuses flash-attn 2.0.0" in warning.message
    assert warning.fix == "pip install --upgrade flash-attn"


# ---------------------------------------------------------------------------------------------
# Real GPUs (scripts/gpu.sh selects these with -m gpu)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpus_are_reported_as_torch_sees_them() -> None:
    report = diagnose()
    print(render_text(report))  # noqa: T201 - the real report goes to the log (gpu.sh runs -rA)
    assert len(report.gpus) == torch.cuda.device_count()
    for seen in report.gpus:
        free, total = torch.cuda.mem_get_info(seen.index)
        assert seen.name == torch.cuda.get_device_name(seen.index)
        assert seen.capability == tuple(torch.cuda.get_device_capability(seen.index))
        assert seen.total_bytes == total
        assert seen.free_bytes is not None
        assert 0 < seen.free_bytes <= total
        assert abs(seen.free_bytes - free) < total // 10  # other processes may allocate meanwhile
        assert seen.bf16 == (seen.capability >= (8, 0) or torch.version.hip is not None)
    current = torch.cuda.current_device()
    assert report.gpus[current].bf16 == torch.cuda.is_bf16_supported(including_emulation=False)
    assert report.auto_device == f"cuda:{current}"
    assert report.devices[: len(report.gpus)] == tuple(f"cuda:{g.index}" for g in report.gpus)
    flash_ready = (
        transformers.utils.is_flash_attn_2_available()
        and any(g.capability >= (8, 0) for g in report.gpus)
        and not next(p for p in report.versions if p.name == "flash-attn").note
    )
    assert attention(report)["flash_attention_2"][0] == flash_ready
    runs = [line for line in _flash_lines(report) if "flash_attention_2 runs here" in line]
    assert len(runs) == (len(report.gpus) if flash_ready else 0)
    assert report.exit_code == (1 if report.errors else 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpus_json_from_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omnifix", "doctor", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    print(json.dumps(data, indent=2))  # noqa: T201 - for the GPU run's log
    assert result.returncode == data["exit_code"] == (1 if data["errors"] else 0)
    assert len(data["gpus"]) == torch.cuda.device_count()
    assert all(gpu["free_bytes"] is not None for gpu in data["gpus"])


def test_reports_what_transformers_loads_with() -> None:
    report = diagnose()
    shown = {package.name: package for package in report.versions}
    for name in ("huggingface_hub", "tokenizers", "safetensors"):
        assert shown[name].version == importlib.metadata.version(name)
        assert re.search(rf"^{name} +\S+ +by transformers$", render_text(report), re.MULTILINE)


@pytest.mark.parametrize(
    ("installed", "warned"),
    [
        ({}, set()),  # the tested releases (or older): nothing to say
        ({"transformers": "5.24.9"}, set()),  # a patch release of the newest tested line
        ({"transformers": "5.25.0"}, {"transformers"}),
        ({"transformers": "6.0.0rc1", "accelerate": "1.17.0"}, {"transformers", "accelerate"}),
    ],
)
def test_warns_when_newer_than_the_newest_tested(
    installed: dict[str, str], warned: set[str]
) -> None:
    from omnifix._compat import NEWEST_TESTED

    tested = {name: f"{version}.0" for name, version in NEWEST_TESTED.items()}
    with distributions({**tested, **installed}):
        report = diagnose()
    newer = [f for f in report.findings if "newer than the newest" in f.message]
    assert {f.message.split()[0] for f in newer} == warned
    assert all(f.level == "warn" for f in newer)
    assert report.exit_code == diagnose().exit_code  # a warning, not an error
    for finding in newer:
        name = finding.message.split()[0]
        assert f"({NEWEST_TESTED[name]}.x)" in finding.message
        assert finding.fix.startswith(f'If something fails, pip install "{name}<')
