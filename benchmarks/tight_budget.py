"""The planner's promise, tested at the edge: run each workload at the smallest budget it accepts.

    PYTHONPATH=src python3 benchmarks/tight_budget.py

On one GPU, for each case: the smallest budget ``plan_placement`` accepts for the workload (the
plan's need at a large budget, total + margin, rounded up to 1 MiB: on one GPU a row does not
depend on its budget; checked by planning again at that budget), the GPU capped there with
``torch.cuda.set_per_process_memory_fraction`` (the budget less the CUDA context, which lives
outside the allocator), the preset built at full size with random bf16 weights on the GPU
(``_models.materialize``), and the workload's ``generate`` run greedily for exactly its new
tokens. Recorded per case: the outcome at the accepted budget (``ok`` or ``oom``), the measured
reserved peak (``max_memory_reserved`` + the bytes held outside the allocator), the prediction
error (predicted total / measured reserved peak - 1), the slack (1 - peak / budget), and the
allocated peak beside them. Cases are tagged ``fit`` (the Qwen2/2.5 runs the memory model's
constants were fitted on) or ``validation`` (architectures no constant was fitted on); the
summary gives each set's median and worst error and slack, and the out-of-memory count.

On a GPU each case runs in a fresh process, as a user's program does: what the process holds
outside the allocator (the CUDA context, the kernels loaded lazily on first use) is then that one
model's, not everything the earlier cases loaded. The cap limits the allocator only, so a case
whose measured peak (allocator + outside bytes) ends above its budget would have run out on a card
of that size: it is recorded as ``over budget`` and counted with the out-of-memory runs.

The allocator configuration is the one ``load_safely`` starts CUDA with, ``expandable_segments``
(``--allocator default`` for the default configuration); it is set before torch is imported and
the planner reads the same setting. JSON goes to ``$OMNIFIX_GPU_OUT`` (a directory) or
``benchmarks/results/`` as ``tight-budget-<allocator>-<gpu>.json``; ``--deadline`` stops starting
new cases after that many seconds (default 420, so that the run ends within 8 minutes).

``--tiny``: the same code on the cpu with tiny configs of the same families (no cap, no peak);
``--plan-only``: every full-size case planned and its inputs built, on the cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One workload of one preset under one attention implementation."""

    preset: str
    attn: str
    work: dict[str, Any]
    group: str = "validation"
    #: How to build the inputs: ``"prompt"`` (``_models.workload_inputs``), ``"whisper"``.
    inputs: str = "prompt"
    tags: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        parts = "-".join(f"{k}{v}" for k, v in self.work.items())
        return f"{self.preset}/{self.attn}/{parts}"


CASES: tuple[Case, ...] = (
    # The memory model's constants were fitted on these families (Qwen2/2.5, torch 2.11).
    Case("qwen2.5-vl-7b", "sdpa", {"text_tokens": 8192, "max_new_tokens": 64}, "fit"),
    Case(
        "qwen2.5-vl-7b", "sdpa", {"text_tokens": 256, "image_tokens": 1280}, "fit", tags=("media",)
    ),
    # Validation: no constant was fitted on any of these.
    Case("llama-3.1-8b", "sdpa", {"text_tokens": 16384, "max_new_tokens": 128}),
    Case("gemma-3-4b", "sdpa", {"text_tokens": 8192, "max_new_tokens": 128}, tags=("sliding",)),
    Case("mistral-7b-v0.1", "sdpa", {"batch_size": 2, "text_tokens": 8192, "max_new_tokens": 64}),
    Case("qwen3-8b", "eager", {"text_tokens": 4096, "max_new_tokens": 64}, tags=("eager",)),
    Case("qwen3-8b", "sdpa", {"text_tokens": 1024, "max_new_tokens": 1024}, tags=("long decode",)),
    Case("qwen3-30b-a3b", "sdpa", {"text_tokens": 8192, "max_new_tokens": 64}, tags=("moe",)),
    Case(
        "qwen3-vl-8b",
        "sdpa",
        {"text_tokens": 256, "image_tokens": 2048, "max_new_tokens": 128},
        tags=("media",),
    ),
    Case("qwen3-omni-30b-a3b-thinker", "sdpa", {"text_tokens": 4096, "max_new_tokens": 64}),
    Case(
        "llama-3.2-11b-vision", "sdpa", {"batch_size": 2, "text_tokens": 4096, "max_new_tokens": 64}
    ),
    Case(
        "whisper-large-v3",
        "sdpa",
        {"batch_size": 4, "text_tokens": 4, "audio_seconds": 30, "max_new_tokens": 440},
        inputs="whisper",
        tags=("media", "long decode"),
    ),
    Case("flan-t5-large", "eager", {"batch_size": 8, "text_tokens": 1024, "max_new_tokens": 128}),
    Case("flan-t5-large", "sdpa", {"batch_size": 8, "text_tokens": 1024, "max_new_tokens": 128}),
    Case("gpt2", "eager", {"batch_size": 16, "text_tokens": 256, "max_new_tokens": 256}),
    # flash_attention_2 (run where flash-attn imports, skipped elsewhere).
    Case(
        "qwen3-8b",
        "flash_attention_2",
        {"text_tokens": 8192, "max_new_tokens": 64},
        tags=("flash",),
    ),
    Case(
        "qwen3-vl-8b",
        "flash_attention_2",
        {"text_tokens": 256, "image_tokens": 2048, "max_new_tokens": 128},
        tags=("flash", "media"),
    ),
    Case(
        "mistral-7b-v0.1",
        "flash_attention_2",
        {"batch_size": 2, "text_tokens": 8192, "max_new_tokens": 64},
        tags=("flash",),
    ),
)
#: --tiny: the same families, shrunk (the cpu runs them in seconds).
TINY_PRESETS = ("llama-3.1-8b", "gemma-3-1b", "qwen3-30b-a3b", "flan-t5-large", "gpt2")
_TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 8,
    "layer_types": None,
    "d_model": 64,
    "d_ff": 128,
    "d_kv": 16,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 512,
}


def _tiny_config(preset: str) -> Any:
    from omnifix._plan.presets import preset_config

    config = preset_config(preset)
    for name, value in _TINY_SIZES.items():
        if hasattr(config, name) and (value is not None or name == "layer_types"):
            setattr(config, name, value)
    if getattr(config, "layer_types", "absent") is None and hasattr(config, "sliding_window"):
        config.layer_types = ["sliding_attention", "full_attention"]
    return config


#: Outcomes of a case that ran: within its budget, out of memory, or above it outside the cap.
_RAN = ("ok", "oom", "over budget")


def _summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for group in ("fit", "validation"):
        done = [c for c in cases if c["group"] == group and c.get("outcome") in _RAN]
        finished = [c for c in done if c["outcome"] != "oom"]  # generate ran to its end
        errors = [c["error"] for c in finished if c.get("error") is not None]
        slack = [c["slack"] for c in finished if c.get("slack") is not None]
        summary[group] = {
            "cases": len(done),
            "oom": sum(1 for c in done if c["outcome"] == "oom"),
            "over_budget": sum(1 for c in done if c["outcome"] == "over budget"),
            "architectures": sorted({c["preset"] for c in done}),
            "error_median": round(statistics.median(map(abs, errors)), 4) if errors else None,
            "error_worst": max(errors, key=abs) if errors else None,
            "error_below_zero": sum(1 for e in errors if e < 0),
            "slack_median": round(statistics.median(slack), 4) if slack else None,
            "slack_worst": max(slack) if slack else None,
        }
    return summary


def _whisper_inputs(model: Any, work: Any, device: Any) -> dict[str, Any]:
    import torch

    config = model.config
    frames = 2 * int(config.max_source_positions)  # 30 s of 100 mel frames per second
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(work.batch_size, config.num_mel_bins, frames, generator=generator)
    start = int(config.decoder_start_token_id)
    prompt = torch.full((work.batch_size, work.text_tokens), start, dtype=torch.long)
    return {
        "input_features": features.to(device, dtype),
        "decoder_input_ids": prompt.to(device),
    }


def _generate(model: Any, inputs: dict[str, Any], new_tokens: int) -> None:
    import torch
    from transformers import GenerationMixin

    with torch.inference_mode():
        # GenerationMixin's own generate: Whisper's wrapper wants language and task tables that a
        # config-built model has no generation config for.
        GenerationMixin.generate(
            model, **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )


def _workload(case: Case, *, tiny: bool) -> Any:
    import omnifix

    sizes = dict(case.work)
    if tiny:  # seconds on the cpu: a short prompt, a few new tokens, a small batch
        sizes.update(
            text_tokens=min(sizes.get("text_tokens", 512), 48),
            max_new_tokens=min(sizes.get("max_new_tokens", 256), 6),
            batch_size=min(sizes.get("batch_size", 1), 2),
        )
    return omnifix.Workload(**sizes)


def _plan_at_the_edge(case: Case, work: Any, *, tiny: bool) -> tuple[Any, dict[str, Any]]:
    """The plan at the smallest budget it accepts, and what the record keeps of it."""
    import omnifix
    from omnifix._plan.presets import preset_model_class

    model_arg: Any = _tiny_config(case.preset) if tiny else case.preset
    kwargs: dict[str, Any] = {"workload": work, "attn_implementation": case.attn}
    kwargs["dtype"] = "float32" if tiny else "bfloat16"
    if tiny:
        kwargs["model_class"] = preset_model_class(case.preset)
    key = "cpu" if tiny else 0
    large = omnifix.plan_placement(model_arg, budgets={key: "1024GiB"}, **kwargs)
    row = large.devices[0]
    budget = -(-(row.total + row.margin) // MIB) * MIB
    plan = omnifix.plan_placement(model_arg, budgets={key: budget}, **kwargs)
    row = plan.devices[0]
    notes = [n for n in plan.notes if n.startswith(("GPU figures", "not understood"))]
    return plan, {
        "budget": budget,
        "accepted": plan.fits,
        "strategy": plan.strategy,
        "predicted": row.total,
        "predicted_allocated": row.total - row.allocator,
        "margin": row.margin,
        "allocator_share": row.allocator,
        "phase": row.phase,
        "notes": notes,
    }


def _inputs(case: Case, model: Any, work: Any, device: str) -> dict[str, Any]:
    from _models import workload_inputs

    if case.inputs == "whisper":
        return _whisper_inputs(model, work, device)
    return workload_inputs(model, work, device=device)


def _build(case: Case, *, tiny: bool, target: str) -> Any:
    import torch
    from _memory import set_attention
    from _models import materialize

    from omnifix._plan.presets import preset_model_class
    from omnifix._plan.skeleton import build_on_meta, build_skeleton

    if tiny:
        cls = preset_model_class(case.preset)
        model: Any = build_on_meta(_tiny_config(case.preset), cls, torch.float32)
    else:
        model = build_skeleton(case.preset)
    materialize(model, {"": target})
    model.eval()
    set_attention(model, case.attn)
    return model


def _measure(record: dict[str, Any], gpu: int) -> None:
    import torch
    from _memory import outside_allocator

    outside = outside_allocator(gpu)
    peak = int(torch.cuda.max_memory_reserved(gpu)) + outside
    allocated = int(torch.cuda.max_memory_allocated(gpu)) + outside
    record.update(measured_reserved=peak, measured_allocated=allocated, outside_allocator=outside)
    if record["outcome"] == "ok":
        record["error"] = round(record["predicted"] / peak - 1, 4)
        record["slack"] = round(1 - peak / record["budget"], 4)
        record["error_allocated"] = round(record["predicted_allocated"] / allocated - 1, 4)
        if peak > record["budget"]:  # the kernels loaded after the cap was set took the rest
            record["outcome"] = "over budget"


def run_case(case: Case, *, tiny: bool, gpu: int, plan_only: bool = False) -> dict[str, Any]:
    """Plan at the edge, cap, build, generate, measure one case."""
    import torch
    from _memory import free_memory, set_caps, warm_up
    from _results import error_status

    from omnifix._plan.skeleton import build_skeleton

    work = _workload(case, tiny=tiny)
    record: dict[str, Any] = {
        "case": case.key,
        "preset": case.preset,
        "group": case.group,
        "attn": case.attn,
        "workload": str(work),
        "tags": list(case.tags),
    }
    _, planned = _plan_at_the_edge(case, work, tiny=tiny)
    record.update(planned)
    if not record["accepted"]:
        record["outcome"] = "not accepted"
        return record
    if plan_only:  # the inputs too, from the skeleton's config, on the cpu
        inputs = _inputs(case, build_skeleton(case.preset), work, "cpu")
        record["inputs"] = {k: list(v.shape) for k, v in inputs.items()}
        record["outcome"] = "planned"
        return record
    contexts: dict[int, int] = {}
    if not tiny:
        from _memory import outside_allocator

        torch.empty(1, device=gpu)  # the CUDA context alone
        record["outside_at_init"] = outside_allocator(gpu)
        contexts = warm_up([gpu])
        record["outside_at_start"] = contexts[gpu]
        record["cap_fraction"] = set_caps({gpu: record["budget"]}, contexts)[gpu]
        torch.cuda.reset_peak_memory_stats(gpu)
    model: Any = None
    start = time.perf_counter()
    try:
        model = _build(case, tiny=tiny, target="cpu" if tiny else f"cuda:{gpu}")
        inputs = _inputs(case, model, work, "cpu" if tiny else f"cuda:{gpu}")
        _generate(model, inputs, work.max_new_tokens)
        record["outcome"] = "ok"
    except Exception as error:  # noqa: BLE001 - an out-of-memory is a result
        status = error_status(error)
        record["outcome"] = "oom" if status.startswith("oom") else status
    record["seconds"] = round(time.perf_counter() - start, 2)
    if not tiny:
        _measure(record, gpu)
    del model
    inputs = {}
    free_memory()
    if not tiny:
        set_caps({gpu: None}, contexts)
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the cases in order until the deadline; write the JSON file after each."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--allocator", choices=("expandable", "default"), default="expandable")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the cpu, seconds")
    parser.add_argument(
        "--plan-only", action="store_true", help="plan each case and build its inputs; no GPU"
    )
    parser.add_argument("--only", default="", help="comma-separated parts of case keys")
    parser.add_argument("--deadline", type=float, default=420.0)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run every GPU case in this process (the context then grows from case to case)",
    )
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # one case, in a child
    args = parser.parse_args(argv)
    if args.case:
        return _child(args)
    from _results import write_results

    from omnifix import UnsupportedModelError
    from omnifix._attention import installed_attention
    from omnifix._plan.budgets import allocator_settings
    from omnifix._plan.presets import preset_model_class

    cases = [c for c in CASES if not args.tiny or c.preset in TINY_PRESETS]
    if args.only:
        cases = [c for c in cases if any(p in c.key for p in args.only.split(","))]
    folder = Path(os.environ.get("OMNIFIX_GPU_OUT") or "benchmarks/results")
    name = "tiny" if args.tiny else "plan" if args.plan_only else "h200"
    out = args.out or folder / f"tight-budget-{args.allocator}-{name}.json"
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for case in cases:
        if time.perf_counter() - started > args.deadline:
            records.append({"case": case.key, "group": case.group, "outcome": "skipped: deadline"})
            continue
        runs = not args.plan_only
        if runs and case.attn != "sdpa" and case.attn not in installed_attention():
            outcome = f"skipped: {case.attn} cannot run here"
            records.append({"case": case.key, "group": case.group, "outcome": outcome})
            continue
        try:
            preset_model_class(case.preset)
        except UnsupportedModelError as error:
            records.append({"case": case.key, "group": case.group, "outcome": f"skipped: {error}"})
            continue
        if args.tiny or args.plan_only or not args.isolate:
            record = run_case(case, tiny=args.tiny, gpu=args.gpu, plan_only=args.plan_only)
            record["allocator"] = asdict(allocator_settings())
        else:
            record = _in_fresh_process(case, args)
        records.append(record)
        print(
            {k: record.get(k) for k in ("case", "outcome", "error", "slack", "seconds")}, flush=True
        )
        write_results(out, "tight_budget", __doc__ or "", records, summary=_summary(records))
    summary = _summary(records)
    write_results(out, "tight_budget", __doc__ or "", records, summary=summary)
    print(summary, flush=True)
    return 0


def _in_fresh_process(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``case`` in a child process of its own; its record, or why it gave none."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "record.json"
        command = [sys.executable, __file__, "--case", case.key, "--out", str(out)]
        command += ["--allocator", args.allocator, "--gpu", str(args.gpu)]
        done = subprocess.run(command, check=False, capture_output=True, text=True)  # noqa: S603
        if out.exists():
            record: dict[str, Any] = json.loads(out.read_text())
            return record
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"case": case.key, "group": case.group, "outcome": f"failed: {tail[0]}"}


def _child(args: argparse.Namespace) -> int:
    """``--case KEY --out FILE``: run that one case here and write its record to FILE."""
    from omnifix._plan.budgets import allocator_settings

    (case,) = [c for c in CASES if c.key == args.case]
    record = run_case(case, tiny=False, gpu=args.gpu)
    record["allocator"] = asdict(allocator_settings())
    args.out.write_text(json.dumps(record))
    return 0


def configure_allocator(argv: list[str]) -> None:
    """Set the allocator ``--allocator`` names before torch starts CUDA (unless one is set)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--allocator", choices=("expandable", "default"), default="expandable")
    known, _ = parser.parse_known_args(argv)
    if any(os.environ.get(n) for n in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        return
    if known.allocator == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    configure_allocator(sys.argv[1:])
    sys.exit(main())
