"""The ``omnifix`` command line: ``demo``, ``doctor`` and ``plan`` (docs/cli.md)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import re
import sys
import tempfile
import textwrap
import threading
import time
from typing import TYPE_CHECKING, Any, Final, NoReturn, TextIO, cast

from omnifix._devices import input_device
from omnifix._doctor import run
from omnifix._load import load_safely
from omnifix._plan import Workload, plan_placement
from omnifix._plan.dtypes import dtype_table
from omnifix._plan.presets import PRESETS
from omnifix._report import placement_report
from omnifix._units import parse_size
from omnifix._version import __version__
from omnifix.errors import OmnifixError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from omnifix.testing import Family

#: ``omnifix demo --family`` choices: ``omnifix.testing.FAMILIES``, spelled out so that the other
#: commands start without importing ``omnifix.testing`` (a test checks that the two agree).
DEMO_FAMILIES: Final[tuple[Family, ...]] = (
    "qwen2",
    "qwen2-vl",
    "qwen2.5-vl",
    "qwen2-audio",
    "qwen2.5-omni-thinker",
    "qwen2.5-omni",
)

#: The dtypes ``--dtype`` takes: what models load in (quantisation is not a dtype).
DTYPES: Final = ("auto", "bfloat16", "float16", "float32")
#: Spellings people try for quantised weights, which no ``--dtype`` gives.
_QUANTISED: Final = re.compile(r"u?int\d+|fp[48]|float8.*|nf4|q\d.*|4bit|8bit", re.IGNORECASE)

#: The library's parameter names in its messages, as the flags that set them.
_FLAGS: Final = {
    "allow_offload=True": "--allow-offload",
    "accept_bound=True": "--accept-bound",
    "attn_implementation": "--attn",
    "allow_offload": "--allow-offload",
    "batch_size": "--batch-size",
    "max_new_tokens": "--max-new-tokens",
    "text_tokens": "--text",
    "image_tokens": "--image",
    "video_seconds": "--video",
    "audio_seconds": "--audio",
    "dtype=": "--dtype ",  # only as a parameter: "dtype" is also a word of the prose
    "quantization=": "--quantization ",
    "engine=": "--engine ",
    "gpus_per_node": "--gpus-per-node",
    "tensor_parallel": "--tensor-parallel",
    "pipeline_parallel": "--pipeline-parallel",
}

_DESCRIPTION: Final = (
    "Make Hugging Face transformers models land on the right devices: plan where a model goes "
    "before loading it, check a machine, or try a tiny model on this one."
)
_MAIN_EPILOG: Final = """\
examples:
  omnifix doctor
  omnifix plan qwen2.5-vl-7b --gpu 24GiB
  omnifix demo --family qwen2-audio

Run 'omnifix COMMAND --help' for a command's options. Docs: docs/cli.md in the omnifix sources.
"""
_PLAN_EPILOG: Final = f"""\
presets (or pass a local checkpoint directory or its config.json):
  {", ".join(PRESETS)}

examples:
  omnifix plan qwen2.5-vl-7b --gpu 24GiB --image 1280
  omnifix plan qwen2-vl-7b --gpu 12GiB --gpu 12GiB --batch-size 4 --json
  omnifix plan ./my-checkpoint --gpu 80GB --cpu 64GiB --allow-offload
  omnifix plan Qwen/Qwen2-VL-2B-Instruct --gpu 12GiB --dtypes
  omnifix plan qwen2.5-vl-72b --gpu 24GiB --gpus-per-node 4 --nodes 2 --engine vllm

exit status: 0 the plan fits, 1 it does not (the options that would fit are listed), 2 bad \
arguments or a model omnifix cannot plan.
"""
_DEMO_EPILOG: Final = """\
examples:
  omnifix demo
  omnifix demo --family qwen2.5-omni --device cpu --max-new-tokens 8 --json
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help wrapped to the terminal at spaces only (never inside a word or a --flag-name)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(
            " ".join(text.split()), width, break_long_words=False, break_on_hyphens=False
        )

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines: list[str] = []
        for line in text.splitlines():  # each line a paragraph; its indent kept, and deepened
            lead = indent + line[: len(line) - len(line.lstrip())]
            wrapped = textwrap.wrap(
                line.strip(),
                width,
                initial_indent=lead,
                subsequent_indent=lead + "  " if line.startswith(" ") else lead,
                break_long_words=False,
                break_on_hyphens=False,
            )
            lines += wrapped or [""]
        return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line that names the command and the flag."""

    def error(self, message: str) -> NoReturn:
        """Print ``omnifix plan: --gpu '24': ...`` and how to get help; exit 2."""
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        self.exit(2, f"{self.prog}: {message}\nRun '{self.prog} --help' for the options.\n")


def _size(text: str) -> str:
    """``--gpu``/``--cpu``: a memory size with a unit (the planner parses it again)."""
    try:
        parse_size(text, what="size")
    except OmnifixError:
        bare = text.strip().replace(".", "", 1).isdigit()
        why = "a number without a unit is ambiguous" if bare else "not a memory size"
        unit = f"{text.strip()}GiB" if bare and float(text) > 0 else "24GiB"
        raise argparse.ArgumentTypeError(
            f"{text!r}: {why}; pass a size such as {unit} or 80GB."
        ) from None
    return text


def _count(text: str) -> int:
    """Token and sample counts: whole numbers, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a whole number, 0 or more, such as 512.")
    return value


def _positive(text: str) -> int:
    """Samples per batch: whole numbers, 1 or more."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a whole number, 1 or more, such as 4.")
    return value


def _seconds(text: str) -> float:
    """Seconds of video or audio: 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r}: pass seconds, 0 or more, such as 10 or 2.5.")
    return value


def _dtype(text: str) -> str:
    """``--dtype``: one of :data:`DTYPES`; quantised weights are explained, not accepted."""
    name = text.strip().lower().removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(
        name, name
    )
    if name in DTYPES:
        return name
    choices = ", ".join(DTYPES)
    if _QUANTISED.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {text} is a quantisation, not a dtype a model loads in; pass one of "
            f"{choices}. Quantised weights come from a quantization_config (bitsandbytes, GPTQ, "
            "...) in from_pretrained; when a plan does not fit, its options say whether 4-bit "
            "weights would."
        )
    raise argparse.ArgumentTypeError(f"{text!r}: pass one of {choices}.")


def _in_cli_terms(message: str) -> str:
    """The library's message with its parameter names spelled as this command's flags.

    Example:
        >>> from omnifix._cli import _in_cli_terms
        >>> _in_cli_terms("dtype=fp64 is not a dtype: set image_tokens to 0, or allow_offload=True")
        '--dtype fp64 is not a dtype: set --image to 0, or --allow-offload'
    """
    for name, flag in _FLAGS.items():
        end = "" if name.endswith("=") else r"(?!\w)"  # "dtype=" is followed by its value
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}{end}", flag, message)
        message = message.replace(f"{flag}=", f"{flag} ")
    return re.sub(r"(--[\w-]+)  ", r"\1 ", message)  # "engine= one" -> "--engine one"


@contextlib.contextmanager
def progress(text: str, *, stream: TextIO | None = None) -> Iterator[None]:
    """A spinner with the elapsed seconds on ``stream`` (stderr) while the block runs.

    Only on a terminal: piped or redirected output (``--json | jq``, logs) stays clean. The line
    is erased when the block ends.

    Example:
        >>> import io
        >>> from omnifix._cli import progress
        >>> with progress("planning", stream=io.StringIO()):  # not a terminal: silent
        ...     pass
    """
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        start = time.monotonic()
        for frame in itertools.cycle("|/-\\"):
            out.write(f"\r{frame} {text} ({time.monotonic() - start:.0f} s)")
            out.flush()
            if done.wait(0.2):
                break
        out.write("\r\x1b[2K")  # erase the line
        out.flush()

    spinner = threading.Thread(target=spin, name="omnifix-progress", daemon=True)
    spinner.start()
    try:
        yield
    finally:
        done.set()
        spinner.join()


def _demo(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    # Deferred: only the demo needs the tiny models; the other commands start without them.
    import omnifix.testing

    family = cast("Family", args.family)
    device, max_new_tokens = args.device, args.max_new_tokens
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with (
        progress(f"loading a tiny {family}"),
        tempfile.TemporaryDirectory(prefix="omnifix-demo-") as folder,
    ):
        # A random tiny model, so that the demo runs offline in seconds, loaded through the same
        # path as a real checkpoint: plan, from_pretrained with the plan's map, checks.
        path = omnifix.testing.save_tiny_model(family, folder)
        config = omnifix.testing.tiny_config(family)
        prompt = omnifix.testing.tiny_inputs(family, config)["input_ids"].shape[-1]
        workload = Workload(text_tokens=prompt, max_new_tokens=max_new_tokens)
        model: Any = load_safely(path, device=device, workload=workload)
    where = input_device(model)
    inputs = omnifix.testing.tiny_inputs(family, model.config, device=where)
    extra = omnifix.testing.text_generation_kwargs(family, max_new_tokens=max_new_tokens)
    with progress("generating"), torch.inference_mode():
        output = model.generate(**inputs, **extra, do_sample=False)
    sequences = output[0] if isinstance(output, tuple) else output
    new_tokens = sequences.shape[-1] - inputs["input_ids"].shape[-1]

    count = sum(p.numel() for p in model.parameters())
    report = placement_report(model)
    if args.json:
        print(
            json.dumps(
                {
                    "family": family,
                    "parameters": count,
                    "requested_device": device,
                    "input_device": str(where),
                    "model_device": str(model.device),
                    "generated_tokens": new_tokens,
                    "output_device": str(sequences.device),
                    "placement": report.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    print(f"omnifix demo: tiny {family} ({count:,} parameters), loaded with load_safely")
    print(f"  requested device       {device!r}")
    print(f"  input device           {where}  (model.device says {model.device})")
    print(f"  generated              {new_tokens} tokens on {sequences.device}")
    print(report)
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``omnifix plan``: exit 0 when the plan fits, 1 when it does not (2: bad arguments)."""
    workload = Workload(
        batch_size=args.batch_size,
        text_tokens=args.text,
        image_tokens=args.image,
        video_seconds=args.video,
        audio_seconds=args.audio,
        max_new_tokens=args.max_new_tokens,
    )
    # No --gpu and no --cpu: the planner measures this machine. One --gpu with
    # --gpus-per-node N budgets N such GPUs.
    sizes = list(args.gpu)
    if len(sizes) == 1 and args.gpus_per_node:
        sizes *= args.gpus_per_node
    given: dict[int | str, str] = dict(enumerate(sizes))
    if args.cpu is not None:
        given["cpu"] = args.cpu
    kwargs: dict[str, Any] = {
        "budgets": given or None,
        "attn_implementation": args.attn,
        "workload": workload,
        "allow_offload": args.allow_offload,
        "accept_bound": args.accept_bound,
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
        "token": args.token,
    }
    shown: Any
    with progress(f"planning {args.model}"):
        if args.dtypes:
            shown = dtype_table(args.model, **kwargs)
            fits = any(plan.fits for _, plan in shown.plans)
        else:
            shown = plan_placement(
                args.model,
                dtype=args.dtype,
                quantization=args.quantization,
                engine=args.engine,
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                tensor_parallel=args.tensor_parallel,
                pipeline_parallel=args.pipeline_parallel,
                **kwargs,
            )
            fits = shown.fits
    if args.json:
        print(json.dumps(shown.to_dict(), indent=2))
    elif args.plain:
        print(shown)
    else:
        from rich.console import Console

        Console().print(shown, crop=False)  # a word longer than the width stays whole
    launch = getattr(getattr(shown, "parallel", None), "launch", None)
    if launch is not None and not args.json:
        print(launch.text)  # unwrapped, so that it pastes
    return 0 if fits else 1


def _output_switches(command: argparse.ArgumentParser) -> None:
    output = command.add_argument_group("output")
    switch = output.add_mutually_exclusive_group()
    switch.add_argument("--json", action="store_true", help="print JSON for scripts")
    switch.add_argument("--plain", action="store_true", help="plain text instead of rich tables")


def _add_plan(commands: Any) -> argparse.ArgumentParser:
    plan: argparse.ArgumentParser = commands.add_parser(
        "plan",
        help="where a model goes and whether it fits, offline; exits 1 when it does not fit",
        description="Plan where each module of a model goes on the given (or this machine's) "
        "GPUs for a workload, without loading or downloading weights.",
        epilog=_PLAN_EPILOG,
        formatter_class=_Formatter,
    )
    plan.add_argument(
        "model",
        help="a preset name (listed below), a checkpoint directory or config.json, or a Hub id "
        "(its config.json only is read, within seconds; HF_HUB_OFFLINE=1: from the cache)",
    )
    model = plan.add_argument_group("model")
    model.add_argument(
        "--dtype",
        type=_dtype,
        default="auto",
        help=f"{', '.join(DTYPES)} (default: %(default)s: bfloat16 where the GPUs support it)",
    )
    model.add_argument(
        "--attn",
        default="auto",
        metavar="IMPL",
        help="attention implementation: sdpa, eager, flash_attention_2, ... (default: %(default)s)",
    )
    devices = plan.add_argument_group("devices")
    devices.add_argument(
        "--gpu",
        action="append",
        default=[],
        type=_size,
        metavar="SIZE",
        help="a GPU's memory budget, e.g. 24GiB or 80GB; repeat for several "
        "(default: this machine's GPUs, measured)",
    )
    devices.add_argument(
        "--cpu", type=_size, metavar="SIZE", help="host memory budget, e.g. 64GiB (default: none)"
    )
    devices.add_argument(
        "--allow-offload",
        action="store_true",
        help="accept plans that keep weights on the cpu or disk (slow; default: refuse them)",
    )
    model.add_argument(
        "--accept-bound",
        action="store_true",
        help="plan a model the memory model does not wholly understand on the conservative bound "
        "its notes state (default: refuse to call it a fit)",
    )
    model.add_argument(
        "--quantization",
        choices=("int8", "nf4", "fp4"),
        help="bitsandbytes weights (lm_head and vision/audio towers stay in the dtype)",
    )
    model.add_argument(
        "--dtypes",
        action="store_true",
        help="one table: weights and predicted peak per device in float32, bf16/fp16, int8 and "
        "nf4; exits 1 when none fits",
    )
    hub = plan.add_argument_group("Hub ids")
    hub.add_argument("--revision", help="the branch, tag or commit to read")
    hub.add_argument(
        "--trust-remote-code", action="store_true", help="run the repository's config code"
    )
    hub.add_argument(
        "--token", help="a token for gated or private repositories (default: HF_TOKEN)"
    )
    parallel = plan.add_argument_group("beyond one host")
    parallel.add_argument(
        "--engine",
        help="plan tensor/pipeline parallelism for vllm, sglang or torchrun and print its "
        "command lines",
    )
    parallel.add_argument(
        "--nodes", type=int, metavar="N", help="hosts, each with the --gpu budgets (default 1)"
    )
    parallel.add_argument(
        "--gpus-per-node",
        type=int,
        metavar="N",
        help="GPUs per host (default: one per --gpu; one --gpu is repeated this many times)",
    )
    parallel.add_argument(
        "--tensor-parallel", type=int, metavar="N", help="tensor-parallel size to use"
    )
    parallel.add_argument(
        "--pipeline-parallel", type=int, metavar="N", help="pipeline stages to use"
    )
    work = plan.add_argument_group("workload (per sample)")
    work.add_argument(
        "--text", type=_count, default=512, metavar="N", help="text tokens (default: %(default)s)"
    )
    work.add_argument(
        "--image", type=_count, default=0, metavar="N", help="image tokens (default: %(default)s)"
    )
    work.add_argument(
        "--video", type=_seconds, default=0.0, metavar="S", help="seconds of video (default: 0)"
    )
    work.add_argument(
        "--audio", type=_seconds, default=0.0, metavar="S", help="seconds of audio (default: 0)"
    )
    work.add_argument(
        "--batch-size",
        type=_positive,
        default=1,
        metavar="N",
        help="samples per batch (default: 1)",
    )
    work.add_argument(
        "--max-new-tokens",
        type=_count,
        default=256,
        metavar="N",
        help="new tokens to generate (default: %(default)s)",
    )
    # The names of omnifix 0.1's first releases, kept working but not shown.
    work.add_argument(
        "--batch",
        dest="batch_size",
        type=_positive,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    work.add_argument(
        "--new",
        dest="max_new_tokens",
        type=_count,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    _output_switches(plan)
    return plan


def _add_demo(commands: Any) -> argparse.ArgumentParser:
    demo: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="load a tiny built-in model on this machine's devices and print where it landed",
        description="Build a tiny random model offline, load it with load_safely on this "
        "machine's devices, generate a few tokens and report where everything went.",
        epilog=_DEMO_EPILOG,
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--family",
        default="qwen2-vl",
        choices=DEMO_FAMILIES,
        help="tiny model family: %(choices)s (default: %(default)s)",
        metavar="NAME",
    )
    demo.add_argument("--device", default="auto", help="where to load it (default: %(default)s)")
    demo.add_argument(
        "--max-new-tokens",
        type=_count,
        default=4,
        metavar="N",
        help="new tokens to generate (default: %(default)s)",
    )
    demo.add_argument("--json", action="store_true", help="print JSON for scripts")
    return demo


def parser() -> argparse.ArgumentParser:
    """The ``omnifix`` argument parser: its commands, their flags, help and examples."""
    main_parser = _Parser(
        prog="omnifix",
        description=_DESCRIPTION,
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    main_parser.add_argument("--version", action="version", version=f"omnifix {__version__}")
    commands = main_parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    doctor = commands.add_parser(
        "doctor",
        help="versions, GPUs, attention backends and what to fix; exits 1 when something is broken",
        formatter_class=_Formatter,
        description="Check this machine: omnifix's dependencies, the GPUs torch sees, which "
        "attention implementations work, and what to fix. Exits 1 when something is broken.",
    )
    _output_switches(doctor)
    _add_plan(commands)
    _add_demo(commands)
    return main_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``omnifix`` command line; returns the exit status.

    Example:
        >>> from omnifix._cli import main
        >>> main(["--version"])
        Traceback (most recent call last):
        SystemExit: 0
    """
    args = parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {"plan": _plan, "demo": _demo}
    if args.command == "doctor":
        with progress("checking this machine"):
            return run(as_json=args.json, plain=args.plain)
    try:
        return commands[args.command](args)
    except OmnifixError as error:
        print(f"omnifix {args.command}: {_in_cli_terms(str(error))}", file=sys.stderr)
        return 2
