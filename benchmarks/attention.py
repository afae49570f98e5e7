"""Attention implementations on one GPU: prefill time, decode time per token, peak memory.

For each model (text: the Qwen2.5-7B language model, as a ``Qwen2ForCausalLM`` shaped like
Qwen2.5-VL-7B's; vision: Qwen2.5-VL-7B with one 1024-token image; audio: Qwen2-Audio-7B with 30 s
of audio), random bf16 weights on one GPU, every attention implementation that runs here
(``sdpa``, ``eager``, and ``flash_attention_2`` where flash-attn imports), batch 1 and 4, a
short (512) and a long (8192) text prompt:

- ``prefill_ms``: ``generate(max_new_tokens=1)`` (the prompt's forward pass and one token);
- ``decode_ms_per_token``: ``(generate(1 + N) - generate(1)) / N`` with ``N`` new tokens;
- ``peak_bytes`` / ``reserved_bytes``: the allocator's peak above the weights during
  ``generate(1 + N)`` (``max_memory_allocated`` and ``max_memory_reserved`` minus what was
  allocated before);
- ``logits_vs_sdpa``: the largest absolute difference of the prefill's last-token logits from
  sdpa's, relative to the largest absolute sdpa logit.

Medians over ``--rounds`` rounds (one warm-up first). ``--tiny`` runs the tiny models of
``omnifix.testing`` on the cpu (sdpa and eager), as ``tests/test_benchmarks_attention.py`` does.
Full run on one H200, about 5 minutes::

    PYTHONPATH=src python benchmarks/attention.py --out benchmarks/results/attention-h200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _memory import set_attention, skeleton, tiny_family
from _models import materialize, workload_inputs
from _results import error_status, write_results
from _timing import print_case, tiny_threads

import omnifix

if TYPE_CHECKING:
    import torch
    from torch import nn

SUITE = "attention"
#: Each model: (preset it is built from, text only?, the media of its workload at full size).
MODELS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "text": ("qwen2.5-vl-7b", True, {}),
    "vision": ("qwen2.5-vl-7b", False, {"image_tokens": 1024}),
    "audio": ("qwen2-audio-7b", False, {"audio_seconds": 30.0}),
}
#: The same media for ``--tiny`` (the tiny towers take a few tokens).
TINY_MEDIA: dict[str, dict[str, Any]] = {
    "text": {},
    "vision": {"image_tokens": 4},
    "audio": {"audio_seconds": 0.32},
}
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")


def method(args: argparse.Namespace) -> str:
    return (
        f"One GPU, random N(0, 0.02) bf16 weights, greedy generate. prefill_ms = generate with "
        f"max_new_tokens=1; decode_ms_per_token = (generate(1 + {args.new_tokens}) - "
        f"generate(1)) / {args.new_tokens}; medians of {args.rounds} rounds after one warm-up. "
        "peak_bytes / reserved_bytes = max_memory_allocated / max_memory_reserved during "
        "generate(1 + N) minus the bytes allocated before it (the weights). logits_vs_sdpa = "
        "max |logits - sdpa logits| / max |sdpa logits| of the prefill's last token. Text model: "
        "Qwen2ForCausalLM with Qwen2.5-VL-7B's language-model config; vision: Qwen2.5-VL-7B with "
        "one 1024-token image; audio: Qwen2-Audio-7B with 30 s of audio."
    )


def runnable() -> list[str]:
    """The implementations this process can run, by transformers' own probes."""
    from omnifix._attention import installed_attention

    ready = installed_attention()
    return [name for name in ATTENTIONS if name in ready]


def build(kind: str, *, tiny: bool) -> nn.Module:
    """The model of ``kind`` with random weights, on the GPU (tiny: on the cpu, fp32)."""
    import torch

    preset, text_only, _ = MODELS[kind]
    device: int | str = "cpu" if tiny else 0
    if not text_only:
        return materialize(skeleton(preset, tiny=tiny), {"": device}).eval()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omnifix._plan.skeleton import build_on_meta

    whole = skeleton(preset, tiny=tiny)
    text = getattr(whole.config, "text_config", whole.config)
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
    )
    config = Qwen2Config(**{name: getattr(text, name) for name in fields if hasattr(text, name)})
    dtype = torch.float32 if tiny else torch.bfloat16
    return materialize(build_on_meta(config, Qwen2ForCausalLM, dtype), {"": device}).eval()


def _clock(tiny: bool) -> float:
    import torch

    if not tiny:
        torch.cuda.synchronize()
    return time.perf_counter()


def _generate(model: nn.Module, inputs: dict[str, Any], new: int, *, tiny: bool) -> float:
    """Seconds of one greedy ``generate`` of exactly ``new`` tokens."""
    import torch

    start = _clock(tiny)
    with torch.inference_mode():
        model.generate(  # type: ignore[operator]
            **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
    return _clock(tiny) - start


def _last_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        logits: torch.Tensor = model(**inputs).logits
    return logits[:, -1].float().cpu()


def measure(model: nn.Module, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Prefill and decode times, peaks above the weights, last-token logits of one case."""
    import torch

    tiny = args.tiny
    _generate(model, inputs, 2, tiny=tiny)  # warm-up: kernels, cuBLAS workspaces
    prefill = [_generate(model, inputs, 1, tiny=tiny) for _ in range(args.rounds)]
    whole = []
    peak = reserved = None
    for _ in range(args.rounds):
        if not tiny:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        whole.append(_generate(model, inputs, 1 + args.new_tokens, tiny=tiny))
        if not tiny:
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - before)
            reserved = max(reserved or 0, torch.cuda.max_memory_reserved() - before)
    first, total = statistics.median(prefill), statistics.median(whole)
    return {
        "prefill_ms": round(first * 1e3, 3),
        "decode_ms_per_token": round((total - first) / args.new_tokens * 1e3, 3),
        "peak_bytes": peak,
        "reserved_bytes": reserved,
    }


def run_model(kind: str, args: argparse.Namespace, done: list[dict[str, Any]]) -> None:
    """Every attention x batch x prompt case of one model, appended to ``done`` as it runs."""
    import torch

    try:
        model = build(kind, tiny=args.tiny)
    except Exception as error:  # noqa: BLE001 - a model that cannot be built is a result
        done.append({"model": kind, "status": error_status(error)})
        return
    media = TINY_MEDIA[kind] if args.tiny else MODELS[kind][2]
    device = "cpu" if args.tiny else "cuda:0"
    for batch in args.batches:
        for prompt in args.prompts:
            workload = omnifix.Workload(
                batch_size=batch, text_tokens=prompt, max_new_tokens=args.new_tokens, **media
            )
            reference = None
            for attention in args.attentions:
                case: dict[str, Any] = {
                    "model": kind,
                    "preset": MODELS[kind][0],
                    "attention": attention,
                    "batch": batch,
                    "prompt_tokens": prompt,
                    "media": media,
                    "new_tokens": args.new_tokens,
                }
                inputs: dict[str, Any] = {}
                try:
                    set_attention(model, attention)
                    inputs = workload_inputs(model, workload, device=device)
                    case["input_tokens"] = int(inputs["input_ids"].shape[1])
                    logits = _last_logits(model, inputs)
                    if attention == "sdpa":
                        reference = logits
                    if reference is not None:
                        scale = reference.abs().max().item() or 1.0
                        case["logits_vs_sdpa"] = round(
                            (logits - reference).abs().max().item() / scale, 6
                        )
                    case.update(measure(model, inputs, args))
                    case["status"] = "ok"
                except Exception as error:  # noqa: BLE001 - an OOM or a kernel error is a result
                    case["status"] = error_status(error)
                del inputs
                if not args.tiny:
                    torch.cuda.empty_cache()
                print_case(case)
                done.append(case)
                write_results(args.out, SUITE, method(args), done, summary=summary(done))
    del model


def summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and attention: median prefill and decode ratios to sdpa over the same cases."""
    by_key = {
        (c["model"], c["attention"], c["batch"], c["prompt_tokens"]): c
        for c in cases
        if c.get("status") == "ok"
    }
    result: dict[str, Any] = {}
    for (kind, attention, batch, prompt), case in by_key.items():
        sdpa = by_key.get((kind, "sdpa", batch, prompt))
        if sdpa is None or attention == "sdpa":
            continue
        entry = result.setdefault(f"{kind}/{attention}", {"prefill": [], "decode": [], "peak": []})
        entry["prefill"].append(case["prefill_ms"] / sdpa["prefill_ms"])
        entry["decode"].append(case["decode_ms_per_token"] / sdpa["decode_ms_per_token"])
        if case["peak_bytes"] and sdpa["peak_bytes"]:
            entry["peak"].append(case["peak_bytes"] / sdpa["peak_bytes"])
    return {
        key: {
            f"{name}_vs_sdpa_median": round(statistics.median(values), 3) if values else None
            for name, values in entry.items()
        }
        for key, entry in result.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: text,...")
    parser.add_argument("--attentions", default="", help="default: every one that runs here")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompts", default=None, help="text tokens, default 512,8192 (tiny 8,32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (tiny: 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the cpu, seconds")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.tiny:
        models = [m for m in models if tiny_family(MODELS[m][0]) is not None]
    args.attentions = [a for a in args.attentions.split(",") if a] or runnable()
    args.batches = [int(b) for b in args.batches.split(",")]
    prompts = args.prompts or ("8,32" if args.tiny else "512,8192")
    args.prompts = [int(p) for p in prompts.split(",")]
    if args.new_tokens is None:
        args.new_tokens = 3 if args.tiny else 32
    done: list[dict[str, Any]] = []
    with tiny_threads(args.tiny):
        for kind in models:
            run_model(kind, args, done)
    write_results(args.out, SUITE, method(args), done, summary=summary(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
