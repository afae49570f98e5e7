"""Planning a Hub id that is no preset: its config.json read through huggingface_hub, no weights.

Never the real Hub: a stand-in on localhost (``tests/hub_standin.py``) serves the resolve URLs
that huggingface_hub reads, ``HF_ENDPOINT`` points at it, and ``HF_HOME`` is a fresh cache. Each
case runs in a fresh interpreter, as huggingface_hub reads its environment at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from tests import hub_standin

import omnifix
import omnifix.testing as ot
from omnifix._config import HUB_TIMEOUT

if TYPE_CHECKING:
    from collections.abc import Iterator

SRC = str(Path(omnifix.__file__).parent.parent)
#: Plans each ``[repo, keywords]`` of the JSON list in argv[1]; prints one JSON list: each plan's
#: model, verdict, weights and stored-weights note, or the error's class and message.
_PLAN = """
import json, sys, omnifix
results = []
for repo, kwargs in json.loads(sys.argv[1]):
    try:
        plan = omnifix.plan_placement(repo, budgets={0: "8GiB"}, **kwargs)
        stored = [note for note in plan.notes if note.startswith("stored weights")]
        results.append({"model": plan.model, "fits": plan.fits, "weights": plan.devices[0].weights,
                        "stored": stored[0] if stored else None})
    except omnifix.OmnifixError as error:
        results.append({"error": type(error).__name__, "message": str(error)})
print(json.dumps(results))
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[hub_standin.Hub]:
    folder = ot.save_tiny_model("qwen2", tmp_path / "qwen2")
    files = {"config.json": (folder / "config.json").read_bytes()}
    repos = {"tiny/qwen2": files, "private/qwen2": files}
    yield from hub_standin.serve(hub_standin.Hub(repos=repos, tokens={"private/qwen2": "hf_x"}))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A fresh Hugging Face cache, no token, online."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**keep, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": SRC}


def _plan(env: dict[str, str], *cases: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case's plan (or error) in one fresh interpreter with ``env``."""
    done = subprocess.run(  # noqa: S603 - our own interpreter running the script above
        [sys.executable, "-c", _PLAN, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def _resolved(hub: hub_standin.Hub) -> list[tuple[str, str | None]]:
    """The file requests the Hub saw: (path, authorization)."""
    return [(path, auth) for _, path, auth in hub.requests if "/resolve/" in path]


def test_a_hub_id_plans_from_its_config_alone_then_offline_from_the_cache(
    hub: hub_standin.Hub, env: dict[str, str]
) -> None:
    online = {**env, "HF_ENDPOINT": hub.endpoint}
    cases = [("tiny/qwen2", {}), ("tiny/qwen2", {"revision": "v1"})]
    cases += [("private/qwen2", {}), ("private/qwen2", {"token": "hf_x"})]
    cases += [("tiny/qwen2", {"revision": "v9"}), ("tiny/nothing", {})]
    cases += [("tiny/qwen2", {"trust_remote_code": True})]  # through transformers, after a check
    plain, at_v1, no_token, token, bad_revision, no_repo, remote = _plan(online, *cases)
    assert plain["fits"]
    assert plain["model"] == "tiny/qwen2"
    assert at_v1 == plain
    assert remote == plain
    files = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert set(files) <= {  # configs, never weights
        "/tiny/qwen2/resolve/main/config.json",
        "/tiny/qwen2/resolve/v1/config.json",
        "/private/qwen2/resolve/main/config.json",
    }
    assert ("/tiny/qwen2/resolve/v1/config.json", None) in _resolved(hub)
    assert no_token["error"] == "CheckpointError"
    assert "token" in no_token["message"]
    assert token == {**plain, "model": "private/qwen2"}
    assert ("/private/qwen2/resolve/main/config.json", "Bearer hf_x") in _resolved(hub)
    for refused in (no_token, bad_revision, no_repo):
        assert refused["error"] == "CheckpointError", refused
        assert "\n" not in refused["message"]
        assert "local checkpoint directory" in refused["message"]
    # HF_HUB_OFFLINE: from the cache, nothing asked of the Hub; a repository never read fails.
    offline = {**online, "HF_HUB_OFFLINE": "1"}
    count = len(hub.requests)
    cached, missing = _plan(offline, ("tiny/qwen2", {}), ("tiny/never-fetched", {}))
    assert cached == plain
    assert len(hub.requests) == count
    assert missing["error"] == "CheckpointError"
    assert "\n" not in missing["message"]
    assert "HF_HUB_OFFLINE" in missing["message"]
    assert "preset" in missing["message"]


def test_the_token_comes_from_hf_token(hub: hub_standin.Hub, env: dict[str, str]) -> None:
    (plan,) = _plan({**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_x"}, ("private/qwen2", {}))
    assert plan["fits"]
    assert ("/private/qwen2/resolve/main/config.json", "Bearer hf_x") in _resolved(hub)
    assert all(auth == "Bearer hf_x" for _, auth in _resolved(hub))


def test_a_silent_hub_fails_after_one_bounded_request(env: dict[str, str]) -> None:
    # One HEAD of HUB_TIMEOUT seconds, no retries, then the cache: the wall-clock bound (under
    # 5 s for the Hub, imports aside) is measured by hand and stated in docs/cli.md.
    assert HUB_TIMEOUT <= 3
    silent = hub_standin.silent()
    endpoint = next(silent)
    try:
        (result,) = _plan({**env, "HF_ENDPOINT": endpoint}, ("tiny/qwen2", {}))
    finally:
        silent.close()
    assert result["error"] == "CheckpointError"
    assert "\n" not in result["message"]
    assert f"cannot be reached within {HUB_TIMEOUT:g} s" in result["message"]


def test_cli_hub_flags(hub: hub_standin.Hub, env: dict[str, str]) -> None:
    argv = [sys.executable, "-m", "omnifix", "plan", "private/qwen2", "--gpu", "8GiB", "--json"]
    argv += ["--revision", "v1", "--token", "hf_x"]
    done = subprocess.run(  # noqa: S603 - our own interpreter running omnifix
        argv, env={**env, "HF_ENDPOINT": hub.endpoint}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == "private/qwen2"
    assert ("/private/qwen2/resolve/v1/config.json", "Bearer hf_x") in _resolved(hub)
    assert all(auth == "Bearer hf_x" for _, auth in _resolved(hub))


@pytest.fixture
def weights_hub(tmp_path: Path) -> Iterator[tuple[hub_standin.Hub, dict[str, str]]]:
    """Repositories with safetensors weights (bf16, fp32 norms): one file, and sharded."""
    model = ot.tiny_model("qwen2").to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("norm"):
            module.float()
    notes = {}
    repos = {}
    for repo, shard in (("tiny/single", "10GB"), ("tiny/sharded", "20KB"), ("private/w", "10GB")):
        folder = tmp_path / repo
        model.save_pretrained(folder, max_shard_size=shard)
        repos[repo] = {path.name: path.read_bytes() for path in folder.iterdir()}
        plan = omnifix.plan_placement(folder, budgets={0: "8GiB"})
        notes[repo] = next(note for note in plan.notes if note.startswith("stored weights"))
    assert "model.safetensors.index.json" in repos["tiny/sharded"]
    served = hub_standin.Hub(repos=repos, tokens={"private/w": "hf_x"})
    for started in hub_standin.serve(served):
        yield started, notes


def test_a_hub_id_s_stored_dtypes_come_from_its_headers_alone(
    weights_hub: tuple[hub_standin.Hub, dict[str, str]], env: dict[str, str]
) -> None:
    hub, notes = weights_hub
    online = {**env, "HF_ENDPOINT": hub.endpoint}
    cases = [("tiny/single", {}), ("tiny/sharded", {}), ("tiny/single", {"revision": "v1"})]
    cases += [("private/w", {"token": "hf_x"})]
    single, sharded, at_v1, private = _plan(online, *cases)
    assert single["stored"] == notes["tiny/single"]
    assert sharded["stored"] == notes["tiny/sharded"] == single["stored"]
    assert at_v1["stored"] == single["stored"]
    assert private["stored"] == notes["private/w"]
    weights = [(path, asked) for path, asked in hub.gets if path.endswith(".safetensors")]
    shards = {name for name in hub.repos["tiny/sharded"] if name.endswith(".safetensors")}
    assert len(shards) > 1
    assert {path for path, _ in weights} >= {
        "/tiny/single/resolve/main/model.safetensors",
        *(f"/tiny/sharded/resolve/main/{shard}" for shard in shards),
    }
    assert all(asked is not None for _, asked in weights), weights  # headers, never the weights
    assert any(path == "/tiny/single/resolve/v1/model.safetensors" for path, _ in weights)
    assert all(auth == "Bearer hf_x" for path, auth in _resolved(hub) if "/private/" in path)
    # Offline: the headers were never cached (only ranges were read), so the plan goes without.
    count = len(hub.requests)
    (offline,) = _plan({**online, "HF_HUB_OFFLINE": "1"}, ("tiny/single", {}))
    assert offline == {**single, "stored": None}
    assert len(hub.requests) == count


#: Plans argv[1] twice (the first pays the imports) and prints the second plan's seconds, whether
#: it fits, and whether it has a stored-weights note.
_TIMED = """
import json, sys, time, omnifix
omnifix.plan_placement("qwen2-vl-7b", budgets={0: "8GiB"})
start = time.monotonic()
plan = omnifix.plan_placement(sys.argv[1], budgets={0: "8GiB"})
stored = any(note.startswith("stored weights") for note in plan.notes)
print(json.dumps([time.monotonic() - start, plan.fits, stored]))
"""


def test_a_hub_that_hangs_on_the_weights_leaves_the_headers_out_after_the_hub_timeout(
    weights_hub: tuple[hub_standin.Hub, dict[str, str]], env: dict[str, str]
) -> None:
    hub, _ = weights_hub
    hub.hang = {"model.safetensors", "model.safetensors.index.json"}
    done = subprocess.run(  # noqa: S603 - our own interpreter running the script above
        [sys.executable, "-c", _TIMED, "tiny/single"],
        env={**env, "HF_ENDPOINT": hub.endpoint},
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, fits, stored = json.loads(done.stdout.strip().splitlines()[-1])
    assert fits
    assert not stored
    assert seconds < HUB_TIMEOUT + 1.5


def test_a_dtype_table_reads_a_hub_id_s_headers_once(
    weights_hub: tuple[hub_standin.Hub, dict[str, str]], env: dict[str, str]
) -> None:
    hub, _ = weights_hub
    online = {**env, "HF_ENDPOINT": hub.endpoint}

    def header_reads() -> int:
        return sum(1 for path, _ in hub.gets if path.endswith(".safetensors"))

    _plan(online, ("tiny/single", {}))
    one_plan = header_reads()
    assert one_plan > 0
    argv = [sys.executable, "-m", "omnifix", "plan", "tiny/single", "--gpu", "8GiB", "--dtypes"]
    done = subprocess.run(  # noqa: S603 - our own interpreter running omnifix
        [*argv, "--json"], env=online, capture_output=True, text=True, check=False
    )
    assert done.returncode in (0, 1), done.stderr  # 1: no row fits the budget
    rows = json.loads(done.stdout)["dtypes"]
    assert len(rows) > 1
    assert header_reads() == 2 * one_plan  # the table's rows share one read
