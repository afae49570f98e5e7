"""The ``omnifix`` command line (``omnifix demo``, ``omnifix doctor``, ``omnifix plan``)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Final, cast

from omnifix._devices import input_device
from omnifix._doctor import run
from omnifix._load import load_safely
from omnifix._plan import Workload, plan_placement
from omnifix._plan.dtypes import dtype_table
from omnifix._report import placement_report
from omnifix._units import parse_size
from omnifix.errors import InvalidArgumentError, OmnifixError

if TYPE_CHECKING:
    from collections.abc import Sequence

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


def _demo(family: Family, device: str, max_new_tokens: int) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    # Deferred: only the demo needs the tiny models; the other commands start without them.
    import omnifix.testing

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory(prefix="omnifix-demo-") as folder:
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
    with torch.inference_mode():
        output = model.generate(**inputs, **extra, do_sample=False)
    sequences = output[0] if isinstance(output, tuple) else output
    new_tokens = sequences.shape[-1] - inputs["input_ids"].shape[-1]

    count = sum(p.numel() for p in model.parameters())
    print(f"omnifix demo: tiny {family} ({count:,} parameters), loaded with load_safely")
    print(f"  requested device       {device!r}")
    print(f"  input device           {where}  (model.device says {model.device})")
    print(f"  generated              {new_tokens} tokens on {sequences.device}")
    print(placement_report(model))
    return 0


def _size(flag: str, value: str, example: str) -> int:
    """Bytes of a size flag's value; a bad one is named as the flag, with a spelling that works."""
    try:
        return parse_size(value, what=flag)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(
            f"{flag} {value!r} is not a memory size: {flag} takes a size with a unit. Pass e.g. "
            f"{flag} {example}."
        ) from error


def _plan(args: argparse.Namespace) -> int:
    """``omnifix plan``: exit 0 when the plan fits, 1 when it does not (2: bad arguments)."""
    workload = Workload(
        batch_size=args.batch,
        text_tokens=args.text,
        image_tokens=args.image,
        video_seconds=args.video,
        audio_seconds=args.audio,
        max_new_tokens=args.new,
    )
    # No --gpu and no --cpu: the planner measures this machine. One --gpu with
    # --gpus-per-node N budgets N such GPUs.
    sizes = list(args.gpu)
    if len(sizes) == 1 and args.gpus_per_node:
        sizes *= args.gpus_per_node
    given: dict[int | str, int] = {
        index: _size("--gpu", size, "24GiB") for index, size in enumerate(sizes)
    }
    if args.cpu is not None:
        given["cpu"] = _size("--cpu", args.cpu, "64GiB")
    budgets = given or None
    kwargs: dict[str, Any] = {
        "budgets": budgets,
        "attn_implementation": args.attn,
        "workload": workload,
        "allow_offload": args.allow_offload,
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
        "token": args.token,
    }
    shown: Any
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

        Console().print(shown)
        launch = getattr(getattr(shown, "parallel", None), "launch", None)
        if launch is not None:
            print(launch.text)  # unwrapped, so that it pastes
    return 0 if fits else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``omnifix`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="omnifix", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="load a tiny built-in model on this machine's devices and print where it landed",
    )
    demo.add_argument(
        "--family", default="qwen2-vl", choices=DEMO_FAMILIES, help="tiny model family"
    )
    demo.add_argument("--device", default="auto", help='where to load it (default: "auto")')
    demo.add_argument("--max-new-tokens", type=int, default=4)
    doctor = commands.add_parser(
        "doctor",
        help="versions, GPUs, attention backends and what to fix; exits 1 when something is broken",
    )
    plan = commands.add_parser(
        "plan",
        help="where a model goes and whether it fits, offline; exits 1 when it does not fit",
    )
    plan.add_argument(
        "model",
        help="a preset name, a local checkpoint directory or config.json, or a Hub id (its "
        "config.json only is read, within seconds; HF_HUB_OFFLINE=1: from the cache)",
    )
    plan.add_argument(
        "--gpu",
        action="append",
        default=[],
        metavar="SIZE",
        help="a GPU's budget, e.g. 24GiB; repeat for several (default: this machine's)",
    )
    plan.add_argument("--cpu", metavar="SIZE", help="host memory budget (e.g. 64GiB)")
    plan.add_argument("--dtype", default="auto", help='e.g. bfloat16 (default: "auto")')
    plan.add_argument("--attn", default="auto", help='e.g. sdpa, eager (default: "auto")')
    plan.add_argument("--text", type=int, default=512, help="text tokens per sample")
    plan.add_argument("--image", type=int, default=0, help="image tokens per sample")
    plan.add_argument("--video", type=float, default=0.0, help="seconds of video per sample")
    plan.add_argument("--audio", type=float, default=0.0, help="seconds of audio per sample")
    plan.add_argument("--batch", type=int, default=1, help="samples per batch")
    plan.add_argument("--new", type=int, default=256, help="new tokens to generate")
    plan.add_argument(
        "--allow-offload", action="store_true", help="let weights go to the cpu or disk"
    )
    plan.add_argument(
        "--quantization",
        choices=("int8", "nf4", "fp4"),
        help="bitsandbytes weights (lm_head and vision/audio towers stay in the dtype)",
    )
    plan.add_argument(
        "--dtypes",
        action="store_true",
        help="one table: weights and predicted peak per device in float32, bf16/fp16, int8 and "
        "nf4; exits 1 when none fits",
    )
    plan.add_argument("--revision", help="Hub id: the branch, tag or commit to read")
    plan.add_argument(
        "--trust-remote-code", action="store_true", help="Hub id: run the repository's config code"
    )
    plan.add_argument(
        "--token", help="Hub id: a token for gated or private repositories (default: HF_TOKEN)"
    )
    plan.add_argument(
        "--engine",
        help="plan tensor/pipeline parallelism for vllm, sglang or torchrun and print its "
        "command lines",
    )
    plan.add_argument("--nodes", type=int, help="hosts, each with the --gpu budgets (default 1)")
    plan.add_argument(
        "--gpus-per-node",
        type=int,
        help="GPUs per host (default: one per --gpu; one --gpu is repeated this many times)",
    )
    plan.add_argument("--tensor-parallel", type=int, help="tensor-parallel size to use")
    plan.add_argument("--pipeline-parallel", type=int, help="pipeline stages to use")
    for sub in (doctor, plan):  # the same output switches
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.add_argument("--plain", action="store_true", help="plain text instead of rich tables")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        return run(as_json=args.json, plain=args.plain)
    try:
        if args.command == "plan":
            return _plan(args)
        return _demo(cast("Family", args.family), args.device, args.max_new_tokens)
    except OmnifixError as error:
        print(f"omnifix: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
