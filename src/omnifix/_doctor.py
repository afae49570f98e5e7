"""``omnifix doctor``: what this machine's stack and GPUs can do, and what to fix first.

:func:`diagnose` gathers the facts (package versions, each GPU's memory, compute capability and
bfloat16 support, the attention backends that will work) and judges them into
:class:`Finding` s of level ``ok``, ``warn`` or ``error``, each with its fix. It never raises:
a probe that fails becomes a finding. :func:`render_text` and :func:`render_rich` print a
:class:`Diagnosis` for people, :meth:`Diagnosis.to_dict` for scripts (``omnifix doctor --json``).

Every fact comes from torch's own probes (``torch.cuda.is_available``, ``device_count``,
``get_device_properties``, ``get_device_capability``, ``mem_get_info``) and from the installed
distributions' metadata, so tests simulate machines by patching torch, not omnifix.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import platform
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from omnifix._version import __version__

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "AttentionBackend",
    "Diagnosis",
    "Finding",
    "Gpu",
    "Level",
    "PackageVersion",
    "diagnose",
    "render_rich",
    "render_text",
    "run",
]

#: How bad a finding is: ``error`` makes ``omnifix doctor`` exit 1, ``warn`` does not.
Level = Literal["ok", "warn", "error"]

#: The oldest releases omnifix supports: the floors of ``dependencies`` in pyproject.toml.
MINIMUM_VERSIONS: Final[dict[str, str]] = {
    "torch": "2.4",
    "transformers": "4.45",
    "accelerate": "1.0",
    "rich": "13",
}
#: The first compute capability with native bfloat16 and FlashAttention-2 (Ampere).
_AMPERE: Final = (8, 0)
_GIB: Final = 1024**3
_MIB: Final = 1024**2
#: Less free memory than this and nothing can be loaded on a GPU (a CUDA context alone takes
#: a few hundred MiB): an error.
_NEARLY_FULL_BYTES: Final = 256 * _MIB
#: Less than this share of a GPU's memory free: another process holds the rest; a warning.
_BUSY_SHARE: Final = 0.10
_FLASH_INSTALL: Final = "pip install flash-attn --no-build-isolation"


@dataclass(frozen=True)
class PackageVersion:
    """One package omnifix depends on (or uses when present), as installed here."""

    name: str
    """The distribution name (``"flash-attn"``)."""
    version: str | None
    """The installed version; ``None`` when it is not installed."""
    minimum: str | None = None
    """The oldest version omnifix supports; ``None`` for optional packages."""
    note: str = ""
    """The torch build (``"CUDA 12.8"``), or why an installed package cannot be used."""


@dataclass(frozen=True)
class Gpu:
    """One GPU as torch sees it (indices are torch's, after ``CUDA_VISIBLE_DEVICES``)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int | None
    """Free memory from ``torch.cuda.mem_get_info``; ``None`` when the GPU could not be queried."""
    capability: tuple[int, int]
    """CUDA compute capability, ``(9, 0)`` for an H100."""
    bf16: bool
    """Native bfloat16 (ROCm, or compute capability 8.0 or newer)."""


@dataclass(frozen=True)
class AttentionBackend:
    """An ``attn_implementation`` value and whether models can load with it here."""

    name: str
    usable: bool
    detail: str
    """Where it runs when usable, why not otherwise (with what to do)."""


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
    """The installed omnifix version."""
    python: str
    platform: str
    versions: tuple[PackageVersion, ...]
    cuda_visible_devices: str | None
    """The environment variable as set (``None``: unset)."""
    gpus: tuple[Gpu, ...]
    devices: tuple[str, ...]
    """Every device this process can use, best first, as users write them (``"cuda:0"``)."""
    auto_device: str
    """What ``omnifix.normalize_device("auto")`` gives here."""
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
        return {
            **dataclasses.asdict(self),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "exit_code": self.exit_code,
        }


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``, as packaging's ``Version.release``.

    packaging comes with transformers, which may be what is missing, so it is not used here.
    """
    found = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in found.group().split(".")) if found else ()


def _older_than(version: str, minimum: str) -> bool:
    release = _release(version)
    return bool(release) and release < _release(minimum)  # an unreadable version: trust it


def _torch_build(torch: Any) -> str:
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    if getattr(torch.version, "cuda", None):
        return f"CUDA {torch.version.cuda}"
    return "CPU-only"


def _probe_flash_attn() -> tuple[str | None, str]:
    """``(version, problem)``: ``(None, "")`` when not installed, problem ``""`` when it imports."""
    installed = _installed("flash-attn")
    try:
        module = importlib.import_module("flash_attn")
    # A flash-attn built for another torch or CUDA fails here with "undefined symbol".
    except ImportError as error:
        absent = isinstance(error, ModuleNotFoundError) and error.name == "flash_attn"
        if absent and installed is None:
            return None, ""
        return installed or "?", f"does not import: {error}"
    return str(getattr(module, "__version__", None) or installed or "?"), ""


def _unusable(index: int, name: str, probe: str, error: Exception) -> Finding:
    return Finding(
        "error",
        f"cuda:{index} ({name}) cannot be used: torch.cuda.{probe} failed with "
        f"{str(error).strip()!r}.",
        "Check it with nvidia-smi (another process in exclusive mode, an Xid error); hide it with "
        "CUDA_VISIBLE_DEVICES if it is broken.",
    )


def _gpu_facts(torch: Any, findings: list[Finding]) -> tuple[Gpu, ...]:
    """Each GPU torch sees; a probe that fails for one becomes an error finding."""
    from omnifix._devices import cuda_device_count

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
            free, total = None, int(properties.total_memory)
            findings.append(_unusable(index, properties.name, "mem_get_info", error))
        gpus.append(
            Gpu(
                index=index,
                name=str(properties.name),
                total_bytes=int(total),
                free_bytes=None if free is None else int(free),
                capability=capability,
                # torch.cuda.is_bf16_supported() answers for the current device only; this is its
                # rule (ROCm, or compute capability 8.0+), without emulation, applied per GPU.
                bf16=bool(getattr(torch.version, "hip", None)) or capability >= _AMPERE,
            )
        )
    return tuple(gpus)


def _attention(
    torch: Any, gpus: tuple[Gpu, ...], flash: tuple[str | None, str]
) -> tuple[AttentionBackend, ...]:
    sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    ampere = [gpu.index for gpu in gpus if gpu.capability >= _AMPERE]
    version, problem = flash
    if not gpus:
        why_not = "it runs on CUDA GPUs only, and torch sees none"
    elif not ampere:
        worst = min(gpu.capability for gpu in gpus)
        why_not = (
            "it needs compute capability 8.0 (Ampere) or newer, and these GPUs are "
            f"{worst[0]}.{worst[1]}: use sdpa"
        )
    elif version is None:
        why_not = f"flash-attn is not installed: {_FLASH_INSTALL}"
    elif problem:
        why_not = f"flash-attn {version} {problem}; reinstall it for this torch: {_FLASH_INSTALL}"
    elif not _transformers_accepts_flash():
        why_not = (
            f"transformers' is_flash_attn_2_available() refuses flash-attn {version} (too old "
            "for this transformers?): upgrade flash-attn"
        )
    else:
        why_not = ""
    listed = ", ".join(f"cuda:{index}" for index in ampere)
    return (
        AttentionBackend("eager", usable=True, detail="always (the slowest, most memory)"),
        AttentionBackend(
            "sdpa",
            usable=sdpa,
            detail="torch's scaled_dot_product_attention (transformers' default)"
            if sdpa
            else f"torch {torch.__version__} lacks scaled_dot_product_attention: upgrade torch",
        ),
        AttentionBackend(
            "flash_attention_2",
            usable=not why_not,
            detail=why_not or f"flash-attn {version} on {listed}, in float16 or bfloat16",
        ),
    )


def _transformers_accepts_flash() -> bool:
    try:
        utils = importlib.import_module("transformers.utils")
    except Exception:  # noqa: BLE001 - a broken transformers is reported by _import_findings
        return False
    probe = getattr(utils, "is_flash_attn_2_available", None)
    return bool(probe()) if callable(probe) else False


# --------------------------------------------------------------------------------------------
# Judgements
# --------------------------------------------------------------------------------------------


def _version_findings(versions: tuple[PackageVersion, ...]) -> list[Finding]:
    findings = []
    for package in versions:
        if package.minimum is None:
            continue
        wanted = f"{package.name}>={package.minimum}"
        if package.version is None:
            findings.append(
                Finding(
                    "error",
                    f"{package.name} is not installed; omnifix needs {wanted}.",
                    f"pip install '{wanted}'",
                )
            )
        elif _older_than(package.version, package.minimum):
            findings.append(
                Finding(
                    "error",
                    f"{package.name} {package.version} is older than omnifix supports ({wanted}).",
                    f"pip install --upgrade '{wanted}'",
                )
            )
    return findings


def _import_findings() -> list[Finding]:
    """Installed is not importable: a broken transformers or accelerate fails every load."""
    findings = []
    for module in ("transformers", "accelerate"):
        if _installed(module) is None:
            continue  # reported by _version_findings
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - anything it raises means it is broken
            findings.append(
                Finding(
                    "error",
                    f"{module} is installed but does not import: {type(error).__name__}: {error}",
                    f"Reinstall it: pip install --force-reinstall '{module}'.",
                )
            )
    return findings


def _visible_devices_findings(
    visible: str | None, gpus: tuple[Gpu, ...], build: str
) -> list[Finding]:
    if visible is None:
        return []
    # CUDA reads the list up to the first entry that is not a GPU ("-1", a typo, a duplicate).
    named = [entry.strip() for entry in visible.split(",") if entry.strip()]
    usable = []
    for entry in named:
        if entry.startswith("-"):
            break
        usable.append(entry)
    if not usable:
        return [
            Finding(
                "warn",
                f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process.",
                "Unset it, or list the GPUs to use (CUDA_VISIBLE_DEVICES=0,1).",
            )
        ]
    if len(usable) > len(gpus):
        cause = (
            f"torch is a {build} build and cannot use GPUs"
            if build == "CPU-only"
            else "CUDA stops at the first entry that is not a GPU of this machine"
        )
        fix = (
            "Install a CUDA build of torch (pytorch.org lists the pip command)."
            if build == "CPU-only"
            else "List only GPUs that exist (nvidia-smi -L shows them), or unset it."
        )
        return [
            Finding(
                "error",
                f"CUDA_VISIBLE_DEVICES={visible!r} names {len(usable)} GPU(s), but torch sees "
                f"{len(gpus)}: {cause}.",
                fix,
            )
        ]
    return [
        Finding("ok", f"CUDA_VISIBLE_DEVICES={visible!r}: torch sees the {len(gpus)} GPU(s) named.")
    ]


def _memory_findings(gpus: tuple[Gpu, ...]) -> list[Finding]:
    findings = []
    for gpu in gpus:
        if gpu.free_bytes is None:
            continue
        free, total = _gib(gpu.free_bytes), _gib(gpu.total_bytes)
        if gpu.free_bytes < _NEARLY_FULL_BYTES:
            findings.append(
                Finding(
                    "error",
                    f"cuda:{gpu.index} ({gpu.name}) has {free} free of {total}: nothing can be "
                    "loaded on it.",
                    "Stop the processes that hold it (nvidia-smi lists them), or hide it with "
                    "CUDA_VISIBLE_DEVICES.",
                )
            )
        elif gpu.free_bytes < _BUSY_SHARE * gpu.total_bytes:
            findings.append(
                Finding(
                    "warn",
                    f"cuda:{gpu.index} ({gpu.name}) has only {free} free of {total}: other "
                    "processes hold the rest, and device_map='auto' will put little there.",
                    "Stop them (nvidia-smi lists them), or use other GPUs (CUDA_VISIBLE_DEVICES).",
                )
            )
    return findings


def _mixed_gpu_findings(gpus: tuple[Gpu, ...], visible: str | None) -> list[Finding]:
    findings = []
    ampere = [gpu for gpu in gpus if gpu.capability >= _AMPERE]
    older = [gpu for gpu in gpus if gpu.capability < _AMPERE]
    if ampere and older:
        # Torch's index i is the i-th entry of CUDA_VISIBLE_DEVICES when it is set.
        entries = [entry.strip() for entry in visible.split(",")] if visible else []
        keep = ",".join(
            entries[gpu.index] if gpu.index < len(entries) else str(gpu.index) for gpu in ampere
        )
        names = ", ".join(
            f"cuda:{gpu.index} ({gpu.name}, {gpu.capability[0]}.{gpu.capability[1]})"
            for gpu in older
        )
        verb = "is" if len(older) == 1 else "are"
        findings.append(
            Finding(
                "warn",
                f"{names} {verb} older than Ampere (8.0): a model split over every GPU loads in "
                "float16 without flash attention.",
                f"Keep the model on the newer GPUs: CUDA_VISIBLE_DEVICES={keep}, or a device_map "
                "that leaves the older ones out.",
            )
        )
    if len({gpu.name for gpu in gpus}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        findings.append(
            Finding(
                "warn",
                "The GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers the fastest "
                "first, so cuda:N and CUDA_VISIBLE_DEVICES=N may not be nvidia-smi's GPU N.",
                "export CUDA_DEVICE_ORDER=PCI_BUS_ID",
            )
        )
    return findings


def _no_gpu_finding(build: str, version: str) -> Finding:
    if build == "CPU-only":
        return Finding(
            "ok",
            f"No GPU: torch {version} is a CPU-only build, so models run on the cpu (float32). "
            "On a GPU machine, install a CUDA build of torch.",
        )
    return Finding(
        "warn",
        f"torch {version} ({build} build) sees no GPU.",
        "Check the driver with nvidia-smi and that CUDA_VISIBLE_DEVICES is not hiding them.",
    )


# --------------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------------


def diagnose() -> Diagnosis:
    """Look at this machine's packages and GPUs, and judge what will and will not work.

    Returns:
        The facts and the findings; never raises (a failing probe becomes a finding).
        ``exit_code`` is 1 when a finding is an ``error``: a required package missing, older
        than omnifix supports or not importable; ``CUDA_VISIBLE_DEVICES`` naming GPUs torch
        cannot see; a GPU that cannot be queried or has (almost) no free memory. Warnings
        (flash-attn installed but broken, a busy GPU, mixed GPU generations, ...) do not
        change it.

    Example:
        >>> from omnifix._doctor import diagnose
        >>> report = diagnose()
        >>> [backend.name for backend in report.attention]
        ['eager', 'sdpa', 'flash_attention_2']
        >>> report.devices[-1], report.exit_code == (1 if report.errors else 0)
        ('cpu', True)
    """
    versions = [
        PackageVersion(name, _installed(name), minimum)
        for name, minimum in MINIMUM_VERSIONS.items()
    ]
    base = Diagnosis(
        omnifix=__version__,
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        versions=(*versions, PackageVersion("flash-attn", _installed("flash-attn"))),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        gpus=(),
        devices=("cpu",),
        auto_device="cpu",
        attention=(),
        findings=(),
    )
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - a broken torch is the first thing to report
        broken = Finding(
            "error",
            f"torch does not import: {type(error).__name__}: {error}",
            "Reinstall torch (pytorch.org lists the pip command for this machine).",
        )
        return dataclasses.replace(base, findings=(*_version_findings(tuple(versions)), broken))
    # torch warns (once per process) when it cannot use the driver: keep that as a finding.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagnosis = _diagnose_with(torch, base, versions)
    messages = dict.fromkeys(str(warning.message).strip() for warning in caught)
    torch_warnings = [
        Finding(
            "warn",
            f"torch warned while looking for GPUs: {message}",
            "Fix what it names (usually the NVIDIA driver: check it with nvidia-smi).",
        )
        for message in messages
        if "cuda" in message.lower()
    ]
    return dataclasses.replace(diagnosis, findings=(*diagnosis.findings, *torch_warnings))


def _diagnose_with(torch: Any, base: Diagnosis, versions: list[PackageVersion]) -> Diagnosis:
    from omnifix._devices import available_devices, normalize_device

    build = _torch_build(torch)
    visible = base.cuda_visible_devices
    versions[0] = dataclasses.replace(versions[0], note=f"{build} build")
    flash = _probe_flash_attn()
    versions.append(PackageVersion("flash-attn", flash[0], note=flash[1]))
    findings = [*_version_findings(tuple(versions)), *_import_findings()]
    gpus = _gpu_facts(torch, findings)
    findings += _visible_devices_findings(visible, gpus, build)
    findings += _memory_findings(gpus) + _mixed_gpu_findings(gpus, visible)
    if flash[1]:
        findings.append(
            Finding(
                "warn",
                f"flash-attn {flash[0]} is installed but {flash[1]}",
                f"Reinstall it for torch {torch.__version__}: {_FLASH_INSTALL}, or uninstall it.",
            )
        )
    if not gpus:
        findings.append(_no_gpu_finding(build, torch.__version__))
    return dataclasses.replace(
        base,
        versions=tuple(versions),
        gpus=gpus,
        devices=tuple(available_devices()),
        auto_device=str(normalize_device("auto")),
        attention=_attention(torch, gpus, flash),
        findings=tuple(findings),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _gib(count: int) -> str:
    return f"{count / _GIB:.1f} GiB"


def _version_cell(package: PackageVersion) -> str:
    text = package.version or "not installed"
    return f"{text} ({package.note})" if package.note else text


def _gpu_row(gpu: Gpu) -> tuple[str, str, str, str, str]:
    free = "?" if gpu.free_bytes is None else _gib(gpu.free_bytes)
    return (
        f"cuda:{gpu.index}",
        gpu.name,
        f"{free} / {_gib(gpu.total_bytes)}",
        f"{gpu.capability[0]}.{gpu.capability[1]}",
        "yes" if gpu.bf16 else "no",
    )


def _summary(diagnosis: Diagnosis) -> str:
    errors, warned = len(diagnosis.errors), len(diagnosis.warnings)
    if not errors and not warned:
        return "Nothing to fix."
    verdict = "broken" if errors else "working"
    return f"{errors} error(s), {warned} warning(s): {verdict} (exit {diagnosis.exit_code})."


def _gpu_heading(diagnosis: Diagnosis) -> str:
    visible = diagnosis.cuda_visible_devices
    shown = "unset" if visible is None else repr(visible)
    return (
        f"GPUs (CUDA_VISIBLE_DEVICES {shown}; devices: {', '.join(diagnosis.devices)}; "
        f"'auto' is {diagnosis.auto_device})"
    )


#: A report section: its heading, column names and rows of plain text.
_Section = tuple[str, tuple[str, ...], Sequence[Sequence[str]]]
#: Cells that rich colours, in the columns named here.
_COLOURED: Final = {"usable", "bf16", "level"}
_COLOURS: Final = {"yes": "green", "no": "yellow", "ok": "green", "warn": "yellow", "error": "red"}


def _sections(diagnosis: Diagnosis) -> list[_Section]:
    return [
        (
            "versions",
            ("package", "version"),
            [("omnifix", diagnosis.omnifix)]
            + [(package.name, _version_cell(package)) for package in diagnosis.versions],
        ),
        (
            _gpu_heading(diagnosis),
            ("device", "name", "free / total", "compute", "bf16"),
            [_gpu_row(gpu) for gpu in diagnosis.gpus],
        ),
        (
            "attention backends",
            ("attn_implementation", "usable", "detail"),
            [
                (backend.name, "yes" if backend.usable else "no", backend.detail)
                for backend in diagnosis.attention
            ],
        ),
        (
            "findings",
            ("level", "finding", "fix"),
            [(finding.level, finding.message, finding.fix) for finding in diagnosis.findings],
        ),
    ]


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_text(diagnosis: Diagnosis) -> str:
    """The report as plain text (what ``omnifix doctor`` prints without ``rich``).

    Example:
        >>> from omnifix._doctor import diagnose, render_text
        >>> print(render_text(diagnose()))  # doctest: +ELLIPSIS
        omnifix doctor: Python ...
        <BLANKLINE>
        versions
          package       version
          omnifix       ...
          torch         ...
    """
    lines = [f"omnifix doctor: Python {diagnosis.python} on {diagnosis.platform}"]
    for heading, columns, rows in _sections(diagnosis):
        lines += ["", heading]
        if not rows:
            lines.append("  none")
        elif heading == "findings":  # long sentences: the fix goes on its own line
            for level, message, fix in rows:
                lines.append(f"  {level:<5}  {message}")
                lines += [f"         fix: {fix}"] if fix else []
        else:
            lines += _table([columns, *rows])
    lines += ["", _summary(diagnosis)]
    return "\n".join(lines)


def render_rich(diagnosis: Diagnosis, console: Console) -> None:
    """Print the report to a ``rich`` console, as tables (needs the optional ``rich`` package)."""
    from rich.markup import escape
    from rich.table import Table

    def cell(column: str, text: str) -> str:
        colour = _COLOURS.get(text) if column in _COLOURED else None
        return f"[{colour}]{escape(text)}[/{colour}]" if colour else escape(text)

    console.print(
        f"[bold]omnifix doctor[/bold]: Python {diagnosis.python} on {escape(diagnosis.platform)}"
    )
    for heading, columns, rows in _sections(diagnosis):
        console.print(f"\n[bold]{escape(heading)}[/bold]")
        if not rows:
            console.print("  none")
            continue
        table = Table(*columns)
        for column in table.columns:
            column.overflow = "fold"  # keep whole words and names, never "…"
        for row in rows:
            table.add_row(*(cell(column, text) for column, text in zip(columns, row, strict=True)))
        console.print(table)
    console.print(f"\n{escape(_summary(diagnosis))}")


def run(*, as_json: bool = False, plain: bool = False) -> int:
    """``omnifix doctor``: print the diagnosis; returns the exit status (1 when broken).

    Args:
        as_json: Print :meth:`Diagnosis.to_dict` as JSON instead of tables.
        plain: Print plain text even when ``rich`` is installed.
    """
    import json

    diagnosis = diagnose()
    if as_json:
        sys.stdout.write(json.dumps(diagnosis.to_dict(), indent=2) + "\n")
        return diagnosis.exit_code
    try:
        from rich.console import Console
    except ImportError:
        plain = True
    if plain:
        sys.stdout.write(render_text(diagnosis) + "\n")
    else:
        render_rich(diagnosis, Console())
    return diagnosis.exit_code
