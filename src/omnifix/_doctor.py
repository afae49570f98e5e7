"""``omnifix doctor``: what this machine's stack and GPUs can do, what to fix (docs/cli.md)."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from omnifix._attention import AMPERE
from omnifix._compat import NEWEST_TESTED, installed_version, requirements, untested_versions
from omnifix._devices import available_devices, cuda_device_count, normalize_device
from omnifix._table import Block, Table, plain, rich
from omnifix._units import MIB, format_bytes
from omnifix._version import __version__

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet
    from rich.console import Console

__all__ = ["Diagnosis", "diagnose", "render_rich", "render_text", "run"]

#: How bad a finding is: ``error`` makes ``omnifix doctor`` exit 1, ``warn`` does not.
Level = Literal["ok", "warn", "error"]

#: Less free than this and nothing loads on a GPU (a CUDA context alone takes a few hundred MiB).
_NEARLY_FULL_BYTES: Final = 256 * MIB
#: Less than this share of a GPU's memory free: other processes hold the rest.
_BUSY_SHARE: Final = 0.10
#: What transformers loads with, shown beside omnifix's own requirements: checkpoints come
#: through huggingface_hub, tokenizers and safetensors files, whose versions explain many failures.
_USED_BY_TRANSFORMERS: Final = ("huggingface_hub", "tokenizers", "safetensors")
#: The distributions a load imports: each one installed must import (flash-attn as flash_attn).
_IMPORTED: Final = ("torch", "transformers", "accelerate", "flash-attn")
#: Builds flash-attn again for the installed torch (not from a wheel cached for another one).
_FLASH_REBUILD: Final = (
    "pip install --force-reinstall --no-deps --no-cache-dir --no-build-isolation flash-attn"
)


@dataclass(frozen=True)
class PackageVersion:
    """One package omnifix requires (or uses when present), as installed here."""

    name: str
    version: str | None
    required: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Gpu:
    """One GPU as torch sees it (indices are torch's, after ``CUDA_VISIBLE_DEVICES``)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int | None
    capability: tuple[int, int]
    bf16: bool


@dataclass(frozen=True)
class AttentionBackend:
    """An ``attn_implementation`` value and whether models can load with it here."""

    name: str
    usable: bool
    detail: str


@dataclass(frozen=True)
class Finding:
    """One judgement: what is wrong (or fine) and, unless ``ok``, what to do about it."""

    level: Level
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Diagnosis:
    """Everything ``omnifix doctor`` found; :attr:`exit_code` is 1 when a finding is an error."""

    omnifix: str
    python: str
    platform: str
    versions: tuple[PackageVersion, ...]
    cuda_visible_devices: str | None
    gpus: tuple[Gpu, ...]
    devices: tuple[str, ...]
    auto_device: str
    attention: tuple[AttentionBackend, ...]
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        """The findings of level ``error``."""
        return tuple(finding for finding in self.findings if finding.level == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The findings of level ``warn``."""
        return tuple(finding for finding in self.findings if finding.level == "warn")

    @property
    def exit_code(self) -> int:
        """1 when something is broken (a finding of level ``error``), else 0."""
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: the fields, plus ``exit_code`` and the error/warning counts."""
        counts = {"errors": len(self.errors), "warnings": len(self.warnings)}
        return {**dataclasses.asdict(self), **counts, "exit_code": self.exit_code}


def _package(name: str, spec: SpecifierSet | None) -> tuple[PackageVersion, Finding | None]:
    """``name`` as installed, and what is wrong: a requirement not met, or it does not import."""
    version = installed_version(name)
    shown = None if version is None else str(version)
    package = PackageVersion(name, shown, None if spec is None else str(spec))
    wanted = f"{name}{spec or ''}"
    # A pre-release meets the requirement of its release (5.0.0rc1 meets ">=4.45").
    if spec is not None and (version is None or not spec.contains(version, prereleases=True)):
        state = "is not installed" if version is None else f"{version} does not meet it"
        message = f"omnifix needs {wanted}; {name} {state}."
        return package, Finding("error", message, f'pip install "{wanted}"')
    if version is None or name not in _IMPORTED:
        return package, None
    try:
        importlib.import_module(name.replace("-", "_"))
    # A flash-attn built for another torch or CUDA fails here with "undefined symbol".
    except Exception as error:  # noqa: BLE001 - anything it raises means it is broken
        note = f"does not import: {type(error).__name__}: {error}"
    else:
        return package, None
    fix = f'pip install --force-reinstall --no-deps "{name}=={version}"'
    if name == "torch":
        fix = "Reinstall torch: pytorch.org lists the pip command for this machine."
    elif name == "flash-attn":
        fix = f"{_FLASH_REBUILD} (or pip uninstall flash-attn)"
    message = f"{name} {version} is installed but {note}."
    broken = Finding("warn" if spec is None else "error", message, fix)
    return dataclasses.replace(package, note=note), broken


def _unusable(index: int, name: str, probe: str, error: Exception) -> Finding:
    return Finding(
        "error",
        f"cuda:{index} ({name}) cannot be used: torch.cuda.{probe} failed with "
        f"{str(error).strip()!r}.",
        "Check it with nvidia-smi (another process in exclusive mode, an Xid error); hide it with "
        "CUDA_VISIBLE_DEVICES if it is broken.",
    )


def _untested() -> list[Finding]:
    """A warning for each of transformers/accelerate newer than omnifix's newest tested release."""
    findings = []
    for name, version in untested_versions().items():
        tested = NEWEST_TESTED[name]
        major, minor = tested.release[:2]
        message = (
            f"{name} {version} is newer than the newest {name} omnifix was tested with "
            f"({tested}.x): it may work, but no test has checked it."
        )
        fix = f'If something fails, pip install "{name}<{major}.{minor + 1}" and report it.'
        findings.append(Finding("warn", message, fix))
    return findings


def _gpu_facts(torch: Any, findings: list[Finding]) -> tuple[Gpu, ...]:
    """Each GPU torch sees; a probe that fails for one becomes an error finding."""
    gpus = []
    for index in range(cuda_device_count()):
        try:
            properties = torch.cuda.get_device_properties(index)
            major, minor = torch.cuda.get_device_capability(index)
        except RuntimeError as error:  # a GPU that fell off the bus, a driver error, ...
            findings.append(_unusable(index, "?", "get_device_properties", error))
            continue
        capability = (int(major), int(minor))
        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError as error:  # busy, exclusive-process mode, out of memory, ...
            free, total = None, properties.total_memory
            findings.append(_unusable(index, properties.name, "mem_get_info", error))
        # torch.cuda.is_bf16_supported() answers for the current device only; this is its rule
        # (ROCm, or compute capability 8.0+), without emulation, applied to each GPU.
        bf16 = bool(getattr(torch.version, "hip", None)) or capability >= AMPERE
        free = None if free is None else int(free)
        gpus.append(Gpu(index, str(properties.name), int(total), free, capability, bf16))
    return tuple(gpus)


def _attention(gpus: tuple[Gpu, ...], flash: PackageVersion) -> tuple[AttentionBackend, ...]:
    ampere = ", ".join(f"cuda:{gpu.index}" for gpu in gpus if gpu.capability >= AMPERE)
    worst = "{}.{}".format(*min((gpu.capability for gpu in gpus), default=AMPERE))
    why_not = ""
    if not gpus:
        why_not = "it runs on CUDA GPUs only, and torch sees none"
    elif not ampere:
        why_not = f"it needs compute capability 8.0 (Ampere) or newer, and these GPUs are {worst}"
        why_not += ": use sdpa"
    elif flash.version is None:
        why_not = "flash-attn is not installed: pip install flash-attn --no-build-isolation"
    elif flash.note:
        why_not = f"flash-attn {flash.version} {flash.note}; rebuild it: {_FLASH_REBUILD}"
    elif not _transformers_accepts_flash():
        why_not = f"transformers' is_flash_attn_2_available() refuses flash-attn {flash.version}"
        why_not += " (too old for this transformers?): upgrade flash-attn"
    usable = f"flash-attn {flash.version} on {ampere}, in float16 or bfloat16"
    sdpa = "torch's scaled_dot_product_attention (transformers' default)"  # in every torch 2.x
    return (
        AttentionBackend("eager", usable=True, detail="always (the slowest, most memory)"),
        AttentionBackend("sdpa", usable=True, detail=sdpa),
        AttentionBackend("flash_attention_2", usable=not why_not, detail=why_not or usable),
    )


def _flash_findings(gpus: tuple[Gpu, ...], flash: PackageVersion) -> list[Finding]:
    """Per GPU: can ``flash_attention_2`` run there, and if not, why and what loads use instead.

    A flash-attn that does not import is a finding of the package check already.
    """
    if not gpus:
        message = "flash_attention_2 needs a CUDA GPU and torch sees none: models load with sdpa."
        return [Finding("ok", message)]
    if flash.note:
        return []
    refused = flash.version is not None and not _transformers_accepts_flash()
    findings = []
    for gpu in gpus:
        where = f"cuda:{gpu.index} ({gpu.name}, compute capability {gpu.capability[0]}."
        where += f"{gpu.capability[1]})"
        if gpu.capability < AMPERE:
            message = f"{where}: flash-attn needs 8.0 or newer; models load with sdpa there."
        elif flash.version is None:
            message = f"{where}: flash-attn is not installed, so models load with sdpa there "
            message += "(for flash attention: pip install flash-attn --no-build-isolation)."
        elif refused:
            message = f"{where}: transformers' is_flash_attn_2_available() refuses flash-attn "
            message += f"{flash.version}; models load with sdpa there."
            findings.append(Finding("warn", message, "pip install --upgrade flash-attn"))
            continue
        else:
            half = "bfloat16 or float16" if gpu.bf16 else "float16"
            message = f"{where}: flash_attention_2 runs here (flash-attn {flash.version}) in "
            message += f"{half}; load_safely picks it."
        findings.append(Finding("ok", message))
    return findings


def _transformers_accepts_flash() -> bool:
    try:
        probe = importlib.import_module("transformers.utils").is_flash_attn_2_available
    except Exception:  # noqa: BLE001 - a broken transformers is a finding of its own
        return False
    return bool(probe())


def _seen(visible: str | None, gpus: tuple[Gpu, ...], build: str, torch: str) -> list[Finding]:
    """Whether torch sees the GPUs that ``CUDA_VISIBLE_DEVICES`` names, or any GPU at all."""
    findings, seen, setting = [], len(gpus), f"CUDA_VISIBLE_DEVICES={visible!r}"
    # CUDA reads the list up to the first entry that is not a GPU ("-1", a typo, a duplicate).
    entries = (entry.strip() for entry in (visible or "").split(","))
    named = [e for e in itertools.takewhile(lambda e: not e.startswith("-"), entries) if e]
    if visible is not None and not named:
        fix = "Unset it, or list the GPUs to use (CUDA_VISIBLE_DEVICES=0,1)."
        findings.append(Finding("warn", f"{setting} hides every GPU from this process.", fix))
    elif visible is not None and len(named) <= seen:
        findings.append(Finding("ok", f"{setting}: torch sees the {seen} GPU(s) named."))
    elif visible is not None:
        cause = "CUDA stops at the first entry that is not a GPU of this machine"
        fix = "List only GPUs that exist (nvidia-smi -L shows them), or unset it."
        if build == "CPU-only":
            cause = f"torch is a {build} build and cannot use GPUs"
            fix = "Install a CUDA build of torch (pytorch.org lists the pip command)."
        message = f"{setting} names {len(named)} GPU(s), but torch sees {seen}: {cause}."
        findings.append(Finding("error", message, fix))
    if not gpus and build == "CPU-only":
        message = f"No GPU: torch {torch} is a CPU-only build, so models run on the cpu (float32)."
        message += " On a GPU machine, install a CUDA build of torch."
        findings.append(Finding("ok", message))
    elif not gpus:
        fix = "Check the driver with nvidia-smi and that CUDA_VISIBLE_DEVICES is not hiding them."
        findings.append(Finding("warn", f"torch {torch} ({build} build) sees no GPU.", fix))
    return findings


def _gpu_findings(gpus: tuple[Gpu, ...], visible: str | None) -> list[Finding]:
    """Full and busy GPUs, older GPUs beside newer ones, and CUDA's own numbering."""
    findings = []
    for gpu in gpus:
        if gpu.free_bytes is None:
            continue
        has = f"cuda:{gpu.index} ({gpu.name}) has"
        memory = f"{format_bytes(gpu.free_bytes)} free of {format_bytes(gpu.total_bytes)}"
        fix = "Stop the processes holding it (nvidia-smi lists them) or {} (CUDA_VISIBLE_DEVICES)."
        if gpu.free_bytes < _NEARLY_FULL_BYTES:
            message = f"{has} {memory}: nothing can be loaded on it."
            findings.append(Finding("error", message, fix.format("hide it")))
        elif gpu.free_bytes < _BUSY_SHARE * gpu.total_bytes:
            message = f"{has} only {memory}: device_map='auto' will put little there."
            findings.append(Finding("warn", message, fix.format("use other GPUs")))
    ampere = [gpu for gpu in gpus if gpu.capability >= AMPERE]
    older = [gpu for gpu in gpus if gpu.capability < AMPERE]
    if ampere and older:
        names = ", ".join(
            f"cuda:{g.index} ({g.name}, {g.capability[0]}.{g.capability[1]})" for g in older
        )
        # Torch's index i is the i-th entry of CUDA_VISIBLE_DEVICES when it is set.
        entries = dict(enumerate(entry.strip() for entry in visible.split(","))) if visible else {}
        keep = ",".join(entries.get(gpu.index, str(gpu.index)) for gpu in ampere)
        message = f"{names} {'is' if len(older) == 1 else 'are'} older than Ampere (8.0): a model "
        message += "split over every GPU loads in float16 without flash attention."
        fix = f"Keep the model on the newer GPUs: CUDA_VISIBLE_DEVICES={keep}, or a device_map "
        fix += "that leaves the older ones out."
        findings.append(Finding("warn", message, fix))
    if len({gpu.name for gpu in gpus}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        message = "The GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers the "
        message += "fastest first, so cuda:N and CUDA_VISIBLE_DEVICES=N may not be nvidia-smi's N."
        findings.append(Finding("warn", message, "export CUDA_DEVICE_ORDER=PCI_BUS_ID"))
    return findings


def diagnose() -> Diagnosis:
    """Look at this machine's packages and GPUs, and judge what will and will not work.

    Returns:
        The facts and the findings (a failing probe is a finding); ``exit_code`` is 1 when a
        finding is an ``error`` (docs/cli.md lists the checks).

    Example:
        >>> from omnifix._doctor import diagnose
        >>> report = diagnose()
        >>> [backend.name for backend in report.attention], report.devices[-1]
        (['eager', 'sdpa', 'flash_attention_2'], 'cpu')
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    python, system = platform.python_version(), f"{platform.system()} {platform.machine()}"
    base = Diagnosis(__version__, python, system, (), visible, (), ("cpu",), "cpu", (), ())
    required = requirements()
    used = [(name, None) for name in _USED_BY_TRANSFORMERS]
    checked = [
        _package(name, spec) for name, spec in [*required.items(), *used, ("flash-attn", None)]
    ]
    packages, findings = [package for package, _ in checked], [f for _, f in checked if f]
    findings += _untested()
    if not required:
        missing = "omnifix's metadata is not installed, so its requirements cannot be checked."
        findings.append(Finding("error", missing, "pip install -e . (in a clone of omnifix)"))
    try:
        import torch
    except Exception:  # noqa: BLE001 - torch missing or broken: a finding above says which
        return dataclasses.replace(base, versions=tuple(packages), findings=tuple(findings))
    hip, cuda = getattr(torch.version, "hip", None), getattr(torch.version, "cuda", None)
    build = f"ROCm {hip}" if hip else f"CUDA {cuda}" if cuda else "CPU-only"
    notes = {"torch": f"{build} build"}
    versions = tuple(dataclasses.replace(p, note=notes.get(p.name, p.note)) for p in packages)
    # torch warns (once per process) when it cannot use the driver: keep that as a finding.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpus = _gpu_facts(torch, findings)
        devices, auto = tuple(available_devices()), str(normalize_device("auto"))
    findings += _seen(visible, gpus, build, torch.__version__)
    findings += _gpu_findings(gpus, visible)
    fix = "Fix what it names (usually the NVIDIA driver: check it with nvidia-smi)."
    for message in dict.fromkeys(str(warning.message).strip() for warning in caught):
        if "cuda" in message.lower():
            findings.append(Finding("warn", f"torch warned while looking for GPUs: {message}", fix))
    attention = _attention(gpus, flash=versions[-1])  # flash-attn is checked last
    findings += _flash_findings(gpus, versions[-1])
    return Diagnosis(
        __version__, python, system, versions, visible, gpus, devices, auto, attention, (*findings,)
    )


def _colour(column: str, text: str) -> str:
    """The rich style of a yes/no or level cell."""
    colours = {"yes": "green", "no": "yellow", "ok": "green", "warn": "yellow", "error": "red"}
    return colours.get(text, "") if column in {"bf16", "usable", "level"} else ""


def _blocks(diagnosis: Diagnosis) -> list[Block]:
    """The report, top to bottom: what both renderers print."""
    versions = [("omnifix", diagnosis.omnifix, "-")]
    for package in diagnosis.versions:
        installed = f"{package.version or 'not installed'}"
        installed += f" ({package.note})" if package.note else ""
        required = package.required or "any"
        if package.required is None:
            used = package.name in _USED_BY_TRANSFORMERS
            required = "by transformers" if used else "optional"
        versions.append((package.name, installed, required))
    gpus = []
    for gpu in diagnosis.gpus:
        free = "?" if gpu.free_bytes is None else format_bytes(gpu.free_bytes)
        memory = f"{free} / {format_bytes(gpu.total_bytes)}"
        compute = "{}.{}".format(*gpu.capability)
        gpus.append((f"cuda:{gpu.index}", gpu.name, memory, compute, "yes" if gpu.bf16 else "no"))
    backends = tuple((b.name, "yes" if b.usable else "no", b.detail) for b in diagnosis.attention)
    # The fix ends the finding's sentence: no fix column to leave empty for ``ok`` findings.
    findings = tuple(
        (f.level, f"{f.message} Fix: {f.fix}" if f.fix else f.message) for f in diagnosis.findings
    )
    visible, fold = diagnosis.cuda_visible_devices, frozenset({"installed", "detail", "finding"})
    attention = ("attn_implementation", "usable", "detail")
    errors, warned = len(diagnosis.errors), len(diagnosis.warnings)
    summary = f"{errors} error(s), {warned} warning(s): {'broken' if errors else 'working'}"
    gpu_title = f"GPUs (CUDA_VISIBLE_DEVICES {'unset' if visible is None else repr(visible)}; "
    gpu_title += f"devices: {', '.join(diagnosis.devices)}; 'auto' is {diagnosis.auto_device})"
    return [
        f"omnifix doctor: Python {diagnosis.python} on {diagnosis.platform}",
        "",
        Table(("package", "installed", "required"), (*versions,), "versions", fold=fold),
        "",
        Table(("device", "name", "free / total", "compute", "bf16"), (*gpus,), gpu_title, _colour),
        "",
        Table(attention, backends, "attention backends", _colour, fold),
        "",
        Table(("level", "finding"), findings, "findings", _colour, fold),
        "",
        f"{summary} (exit {diagnosis.exit_code})." if errors or warned else "Nothing to fix.",
    ]


def render_text(diagnosis: Diagnosis) -> str:
    """The report as plain text (``omnifix doctor --plain``, or without ``rich``)."""
    return plain(_blocks(diagnosis))


def render_rich(diagnosis: Diagnosis, console: Console) -> None:
    """Print the report to a ``rich`` console, as tables."""
    console.print(rich(_blocks(diagnosis)))


def run(*, as_json: bool = False, plain: bool = False) -> int:
    """``omnifix doctor [--json | --plain]``: print the diagnosis; the exit status (1: broken)."""
    diagnosis = diagnose()
    try:
        from rich.console import Console
    except ImportError:
        plain = True
    if as_json:
        sys.stdout.write(json.dumps(diagnosis.to_dict(), indent=2) + "\n")
    elif plain:
        sys.stdout.write(render_text(diagnosis) + "\n")
    else:
        render_rich(diagnosis, Console())
    return diagnosis.exit_code
