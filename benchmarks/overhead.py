"""Per-token decode cost of device hooks: none, accelerate's, omnifix's lean ones; one and two GPUs.

Run on a machine with 2 GPUs (one GPU runs configurations a-c only):

    PYTHONPATH=src python benchmarks/overhead.py \
        --out benchmarks/results/overhead-h200x2-tf5.17.json

For each family (Qwen2.5-VL-7B, the Qwen2.5-Omni-7B thinker, Qwen2-Audio-7B: full size, random
N(0, 0.02) weights, bf16, sdpa) one model is built and every configuration runs on those same
weights; between configurations the hooks are removed and the modules moved to the next map:

    a  one GPU, no hooks (``model.to("cuda:0")``): the 1.00x baseline
    b  one GPU, accelerate hooks: ``dispatch_model(force_hooks=True)`` on the per-layer map of
       (d) with every entry on GPU 0 (what ``from_pretrained(device_map=...)`` adds when forced)
    c  one GPU, omnifix: ``lean_dispatch`` on ``{"": 0}`` (what ``load_safely`` does; 0 hooks)
    d  two GPUs, accelerate hooks on transformers' balanced map (``device_map="auto"``:
       ``_get_device_map`` on 5.x, accelerate's ``get_balanced_memory`` +
       ``infer_auto_device_map`` on 4.x, as their ``from_pretrained`` does)
    e  two GPUs, accelerate hooks on omnifix's plan map (``plan_placement`` of the model being
       run, budgets ``--budget`` per GPU, workload 1024 text tokens + 64 new ones)
    f  the plan map of (e) with ``lean_dispatch`` + ``pin_embeddings`` (as ``load_safely``)
    g  the balanced map of (d) with ``lean_dispatch`` + ``pin_embeddings``

The planner keeps a 7B model on one GPU of 24 GiB (it fits), so the default budget is 12 GiB per
GPU, which makes every family split; the case records the plan's strategy either way.

Decode ms/token = the median time between consecutive decoding steps of one greedy
``generate(max_new_tokens=65, min_new_tokens=65)`` (64 steps after the first token; a
stopping criterion that stops nothing stamps each step, and ``generate`` synchronises on its
verdict every step), 1024-token text-only prompt. A first version took the difference of a
65-token and a 1-token generate; the prefill's jitter made two identical configurations differ
by up to 8 %, so it was replaced. Each configuration is warmed up once (a 65-token generate),
then ``--rounds`` rounds (default 5) run every configuration once, in an order rotated by one per
round. Reported per configuration: median ms/token, min/max and every round's value, the ratio of
the median to (a)'s median of the same run, the hook count, and whether the 64 greedy tokens of
every round equal (a)'s.

Time on 2x H200 (measured: 15-25 ms/token): 3 rounds of all three families took about 90 s.
``--families``, ``--only`` and ``--rounds`` cut it down. ``--tiny`` runs the same code paths on
the cpu with the tiny models (both "GPUs" are the cpu) in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _memory import free_memory, set_attention
from _models import gpu_index, materialize, workload_inputs
from _results import error_status, write_results
from _timing import (
    place,
    print_case,
    spread,
    synchronize,
    tiny_threads,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

SUITE = "overhead"
#: Full-size preset -> the tiny family of omnifix.testing with the same classes.
FAMILIES: dict[str, str] = {
    "qwen2.5-vl-7b": "qwen2.5-vl",
    "qwen2.5-omni-7b": "qwen2.5-omni-thinker",
    "qwen2-audio-7b": "qwen2-audio",
}


@dataclass(frozen=True)
class Config:
    """One way of placing and hooking the model."""

    key: str
    label: str
    gpus: int
    device_map: str  # "single", "per-layer", "balanced" or "plan"
    hooks: str  # "none", "accelerate" or "lean"


CONFIGS: tuple[Config, ...] = (
    Config("a", "1 GPU, no hooks", 1, "single", "none"),
    Config(
        "b", "1 GPU, accelerate hooks (per-layer map, all on GPU 0)", 1, "per-layer", "accelerate"
    ),
    Config("c", "1 GPU, omnifix lean_dispatch", 1, "single", "lean"),
    Config("d", "2 GPUs, balanced map, accelerate hooks", 2, "balanced", "accelerate"),
    Config("e", "2 GPUs, omnifix plan map, accelerate hooks", 2, "plan", "accelerate"),
    Config("f", "2 GPUs, omnifix plan map, lean_dispatch + pin", 2, "plan", "lean"),
    Config("g", "2 GPUs, balanced map, lean_dispatch + pin", 2, "balanced", "lean"),
)


def method(args: argparse.Namespace) -> str:
    """The method line of the results file."""
    return (
        f"decode ms/token = median time between consecutive decoding steps of one greedy "
        f"generate of {args.new_tokens + 1} new tokens ({args.new_tokens} steps after the first "
        f"token), {args.prompt_tokens}-token text prompt, "
        f"{'tiny models on the cpu' if args.tiny else 'full-size random weights, bf16, sdpa'}; "
        f"{args.rounds} interleaved rounds (order rotated each round) after one warm-up per "
        f"configuration; median, min/max, ratio of medians to (a); plan budgets "
        f"{args.budget} per GPU"
    )


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def _transformers_get_device_map() -> Callable[..., Any] | None:
    """transformers 5.x's own ``_get_device_map``; ``None`` on 4.x (accelerate's code is used)."""
    try:
        from transformers.integrations.accelerate import _get_device_map
    except ImportError:
        return None
    return _get_device_map  # type: ignore[no-any-return]


def balanced_map(model: nn.Module, max_memory: dict[int | str, int] | None) -> dict[str, Any]:
    """The map ``from_pretrained(device_map="auto")`` computes for ``model`` on these budgets."""
    import inspect

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    get_device_map = _transformers_get_device_map()
    if get_device_map is not None:
        # Its signature changed between releases; pass what this one takes, as from_pretrained.
        wanted = {"dtype": dtype, "keep_in_fp32_regex": None}
        parameters = inspect.signature(get_device_map).parameters
        extra = {name: value for name, value in wanted.items() if name in parameters}
        return dict(get_device_map(model, "auto", max_memory, None, **extra))
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    from omnifix._plan.skeleton import no_split_modules

    no_split = sorted(no_split_modules(model))
    try:
        balanced = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
        )
    except RuntimeError:
        # accelerate 1.x calls torch.device(0), which a cpu-only torch refuses: only --tiny on a
        # 4.x stack gets here, and its budgets split the tiny model as they are.
        if max_memory is None:
            raise
        balanced = dict(max_memory)
    return dict(
        infer_auto_device_map(
            model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype
        )
    )


def _real(device_map: dict[str, Any], devices: list[Any]) -> dict[str, Any]:
    """Map values as devices of this run: GPU index ``i`` -> ``devices[i]`` (``"cpu"`` in tiny)."""
    return {
        name: value if gpu_index(value) is None else devices[gpu_index(value)]
        for name, value in device_map.items()
    }


def _summary(device_map: dict[str, Any]) -> dict[str, Any]:
    """Entries per device and device boundaries, in map order."""
    counts: dict[str, int] = {}
    boundaries = 0
    previous = None
    for value in device_map.values():
        counts[str(value)] = counts.get(str(value), 0) + 1
        boundaries += previous is not None and value != previous
        previous = value
    return {"entries": counts, "boundaries": boundaries}


# ---------------------------------------------------------------------------------------------
# Placing and hooking
# ---------------------------------------------------------------------------------------------


def _accelerate_hooks(model: nn.Module) -> int:
    return sum(hasattr(module, "_hf_hook") for module in model.modules())


def dispatch(
    model: nn.Module, config: Config, device_map: dict[str, Any]
) -> tuple[int, Callable[[], None]]:
    """Place ``model`` by ``device_map`` and hook it as ``config`` says; return (hooks, undo)."""
    import omnifix

    place(model, device_map)
    if config.hooks == "none":
        model.__dict__.pop("hf_device_map", None)
        return 0, lambda: None
    if config.hooks == "accelerate":
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_module

        # As transformers calls it (accelerate_dispatch / from_pretrained).
        dispatch_model(
            model,
            device_map=device_map,
            force_hooks=True,
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
        )

        def undo_accelerate() -> None:
            remove_hook_from_module(model, recurse=True)
            model.__dict__.pop("hf_device_map", None)

        return _accelerate_hooks(model), undo_accelerate
    # lean: what load_safely does after from_pretrained placed the weights by the map.
    model.hf_device_map = dict(device_map)
    handle = omnifix.lean_dispatch(model, device_map=device_map)
    pin = omnifix.pin_embeddings(model) if len(set(device_map.values())) > 1 else None

    def undo_lean() -> None:
        if pin is not None:
            pin.remove()
        handle.remove()
        model.__dict__.pop("hf_device_map", None)

    hooks = handle.hooks
    return (hooks if isinstance(hooks, int) else len(hooks)), undo_lean


# ---------------------------------------------------------------------------------------------
# One family
# ---------------------------------------------------------------------------------------------


def _build(
    preset: str, args: argparse.Namespace
) -> tuple[nn.Module, dict[str, dict[str, Any]], dict[str, Any]]:
    """The model (on the first device, no hooks), its maps (GPU indices), and facts about them."""
    import torch

    import omnifix
    import omnifix.testing as ot

    workload = omnifix.Workload(text_tokens=args.prompt_tokens, max_new_tokens=args.new_tokens)
    budgets = {0: args.budget, 1: args.budget}
    model: Any
    if args.tiny:
        family = FAMILIES[preset]
        model = ot.tiny_model(family)
        dtype = torch.float32
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        max_memory: dict[int | str, int] | None = {0: size, 1: 2 * size}  # balancing splits it
        plan = omnifix.plan_placement(
            ot.tiny_config(family),
            model_class=ot.model_class(family),
            budgets=budgets,
            dtype=dtype,
            attn_implementation="sdpa",
            workload=workload,
        )
    else:
        from omnifix._plan.skeleton import build_skeleton

        skeleton = build_skeleton(preset)
        model = getattr(skeleton, "thinker", skeleton)  # Omni: text generation is the thinker's
        del skeleton
        dtype = torch.bfloat16
        max_memory = None  # the free memory of every GPU, as from_pretrained measures it
        # The model being run (Omni: the thinker), on meta: the same skeleton the planner builds.
        plan = omnifix.plan_placement(
            model, budgets=budgets, dtype=dtype, attn_implementation="sdpa", workload=workload
        )
    balanced = balanced_map(model, max_memory)
    if not args.tiny:
        materialize(model, {"": 0})
    model.eval()
    set_attention(model, "sdpa")
    maps = {
        "single": {"": 0},
        "per-layer": dict.fromkeys(balanced, 0),
        "balanced": balanced,
        "plan": dict(plan.device_map),
    }
    facts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "plan_strategy": plan.strategy,
        "plan_reason": plan.reason,
        "maps": {name: _summary(device_map) for name, device_map in maps.items()},
    }
    return model, maps, facts


def _generate(
    model: nn.Module, inputs: dict[str, Any], new: int, stamps: list[float] | None = None
) -> Any:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        """Stops nothing; stamps the time each decoding step reaches the stopping check."""

        def __init__(self) -> None:
            self.never: torch.Tensor | None = None

        def __call__(  # the signature generate calls
            self,
            input_ids: torch.Tensor,
            scores: Any,  # noqa: ARG002
            **kwargs: Any,  # noqa: ARG002
        ) -> torch.Tensor:
            if stamps is not None:
                stamps.append(time.perf_counter())
            if self.never is None or self.never.shape[0] != input_ids.shape[0]:
                self.never = torch.zeros(
                    input_ids.shape[0], dtype=torch.bool, device=input_ids.device
                )
            return self.never

    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            **inputs,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([StepClock()]),
        )
    return out[0, -new:].tolist()


def _measure(model: nn.Module, inputs: dict[str, Any], new: int) -> tuple[float, float, list[int]]:
    """(median ms between decoding steps, seconds to the first token, the greedy tokens).

    ``generate`` reads the stopping criteria's verdict on the host every step (a synchronisation),
    so the time between two consecutive checks is one decoding step; the median of the ``new``
    steps after the first token is robust to the odd slow step.
    """
    stamps: list[float] = []
    synchronize()
    start = time.perf_counter()
    greedy = _generate(model, inputs, new + 1, stamps)
    steps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return statistics.median(steps) * 1000, stamps[0] - start, greedy


class _Family:
    """One family's model, maps and measurements, configuration by configuration."""

    def __init__(self, preset: str, args: argparse.Namespace) -> None:
        import torch

        self.preset = preset
        self.args = args
        gpus = 2 if args.tiny else torch.cuda.device_count()
        # Map values are GPU indices; in tiny mode both "GPUs" are the cpu.
        self.devices: list[Any] = ["cpu", "cpu"] if args.tiny else list(range(gpus))
        self.configs = [
            c for c in CONFIGS if c.gpus <= gpus and (not args.only or c.key in args.only)
        ]
        self.alive = list(self.configs)
        self.cases: dict[str, dict[str, Any]] = {}
        for config in CONFIGS:
            case = {"family": preset, "config": config.key, "label": config.label}
            if config in self.configs:
                self.cases[config.key] = {**case, "status": "pending"}
            elif config.gpus > gpus:
                skipped = f"skipped: needs {config.gpus} GPUs, {gpus} visible"
                self.cases[config.key] = {**case, "status": skipped}
        self.samples: dict[str, list[float]] = {c.key: [] for c in self.configs}
        self.one_token: dict[str, list[float]] = {c.key: [] for c in self.configs}
        self.tokens: dict[str, list[list[int]]] = {c.key: [] for c in self.configs}
        self.model: Any = None
        self.maps: dict[str, dict[str, Any]] = {}
        self.facts: dict[str, Any] = {}

    def ordered(self) -> list[dict[str, Any]]:
        return [self.cases[c.key] for c in CONFIGS if c.key in self.cases]

    def build(self) -> bool:
        """Build the model; on failure every configuration records the error."""
        try:
            self.model, self.maps, self.facts = _build(self.preset, self.args)
        except Exception as error:  # noqa: BLE001 - a failed build is a result to record
            for config in self.configs:
                self.cases[config.key]["status"] = error_status(error)
            self.model = None
            free_memory()
            return False
        return True

    def run_one(self, config: Config, *, warm_up: bool) -> None:
        import omnifix

        args, model, case = self.args, self.model, self.cases[config.key]
        workload = omnifix.Workload(text_tokens=args.prompt_tokens, max_new_tokens=args.new_tokens)
        device_map = _real(self.maps[config.device_map], self.devices)
        undo: Callable[[], None] = _nothing
        try:
            hooks, undo = dispatch(model, config, device_map)
            inputs = workload_inputs(model, workload, device=omnifix.input_device(model))
            if warm_up:
                case.update(
                    hooks=hooks,
                    map=config.device_map,
                    devices=sorted({str(v) for v in device_map.values()}),
                    map_summary=self.facts["maps"][config.device_map],
                )
                _generate(model, inputs, args.new_tokens + 1)
            else:
                ms, one, greedy = _measure(model, inputs, args.new_tokens)
                self.samples[config.key].append(ms)
                self.one_token[config.key].append(one * 1000)
                self.tokens[config.key].append(greedy)
            del inputs
        except Exception as error:  # noqa: BLE001 - a failed configuration is a result
            self._fail(config, error)
        finally:
            try:
                undo()
            except Exception as error:  # noqa: BLE001 - recorded; the next config re-places
                self._fail(config, error)
        # No empty_cache between configurations: each one's warm-up leaves the allocator warm,
        # as it is in a serving process; only a failure frees memory.

    def _fail(self, config: Config, error: Exception) -> None:
        self.cases[config.key]["status"] = error_status(error)
        if config in self.alive:
            self.alive.remove(config)
        free_memory()

    def summarise(self) -> None:
        """Medians, spreads, ratios to (a) and the token check, from what was measured so far."""
        baseline = spread(self.samples.get("a", []))["median"]
        reference = self.tokens["a"][0] if self.tokens.get("a") else None
        for key, values in self.samples.items():
            case = self.cases[key]
            stats = spread(values)
            ratio = round(stats["median"] / baseline, 4) if baseline and stats["median"] else None
            seen = self.tokens[key]
            case.update(
                ms_per_token=stats,
                first_token_ms=spread(self.one_token[key]),
                ratio_to_a=ratio,
                tokens_match_a=all(t == reference for t in seen) if reference and seen else None,
                parameters=self.facts["parameters"],
                dtype=self.facts["dtype"],
            )
            if key in {"e", "f"}:
                case.update(
                    plan_strategy=self.facts["plan_strategy"],
                    plan_reason=self.facts["plan_reason"],
                )
            if any(c.key == key for c in self.alive):
                case["status"] = "ok"

    def close(self) -> None:
        if self.model is not None:
            self.model.to("cpu")
        self.model = None
        free_memory()


def _nothing() -> None:
    return None


def run_family(
    preset: str, args: argparse.Namespace, emit: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Every configuration of one family; ``emit`` gets the cases after every round."""
    family = _Family(preset, args)
    if not family.build():
        return family.ordered()
    try:
        for config in list(family.alive):
            family.run_one(config, warm_up=True)
        configs = family.configs
        for round_index in range(args.rounds):
            shift = round_index % max(len(configs), 1)
            for config in configs[shift:] + configs[:shift]:
                if config in family.alive:
                    family.run_one(config, warm_up=False)
            family.summarise()
            emit(family.ordered())
    finally:
        family.close()
    return family.ordered()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated presets")
    parser.add_argument("--only", default="", help="comma-separated configuration keys (a-g)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 1024 (tiny: 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (tiny: 4)")
    parser.add_argument("--budget", default="12GiB", help="per-GPU budget of the plan map")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the cpu, seconds")
    args = parser.parse_args(argv)
    args.only = set(filter(None, args.only.split(",")))
    if args.prompt_tokens is None:
        args.prompt_tokens = 16 if args.tiny else 1024
    if args.new_tokens is None:
        args.new_tokens = 4 if args.tiny else 64
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    done: list[dict[str, Any]] = []

    def emit(partial: list[dict[str, Any]]) -> None:
        write_results(args.out, SUITE, method(args), [*done, *partial])

    with tiny_threads(args.tiny):
        for preset in families:
            cases = run_family(preset, args, emit)
            for case in cases:
                print_case(case)
            done.extend(cases)
            write_results(args.out, SUITE, method(args), done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
