"""``load_safely(..., parallel="tensor")`` under ``torchrun`` on the cpu (gloo), on tiny models."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import omnifix
import omnifix.testing as ot
from omnifix import InvalidArgumentError
from omnifix._compat import tensor_parallel_keyword

NO_TP = tensor_parallel_keyword() is None
SKIP_NO_TP = pytest.mark.skipif(
    NO_TP, reason="the installed transformers has no tensor-parallel loading (4.50+)"
)
PROMPT = [[1, 2, 3, 4, 5]]
NEW_TOKENS = 4

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import omnifix

    path, out = sys.argv[1], sys.argv[2]
    model = omnifix.load_safely(path, parallel="tensor", dtype="float32")
    omnifix.assert_no_meta(model)
    device = omnifix.input_device(model)
    weight = model.model.layers[0].mlp.up_proj.weight
    ids = torch.tensor({prompt}, device=device)
    with torch.inference_mode():
        tokens = model.generate(ids, max_new_tokens={new}, do_sample=False)
    rank = os.environ["RANK"]
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as file:
        json.dump(
            {{
                "tokens": tokens.tolist(),
                "device": str(device),
                "sliced": type(weight).__name__,
                "local_rows": tuple(getattr(weight, "to_local", lambda: weight)().shape)[0],
            }},
            file,
        )
    """
).format(prompt=PROMPT, new=NEW_TOKENS)


def tiny_qwen2(path: pathlib.Path, *, kv_heads: int) -> pathlib.Path:
    """A tiny Qwen2 with 4 attention heads and ``kv_heads`` KV heads, saved to ``path``."""
    import transformers

    config = ot.tiny_config("qwen2")
    config.num_attention_heads = 4
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@SKIP_NO_TP
def test_two_ranks_on_the_cpu_give_the_tokens_of_one_process(tmp_path: pathlib.Path) -> None:
    import transformers

    model_path = tiny_qwen2(tmp_path / "model", kv_heads=2)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    src = str(pathlib.Path(__file__).resolve().parent.parent / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(worker), str(model_path), str(out)]
    done = subprocess.run(  # noqa: S603  # our own interpreter running our own worker
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    whole = transformers.Qwen2ForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.inference_mode():
        expected = whole.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
    intermediate = whole.config.intermediate_size
    for rank in ranks:
        assert rank["tokens"] == expected.tolist()
        assert rank["device"] == "cpu"
        assert rank["sliced"] == "DTensor"
        assert rank["local_rows"] == intermediate // 2


def test_a_rank_count_that_does_not_split_the_kv_heads_is_refused_before_loading(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One KV head cannot be sliced in two by transformers: the planner says so, nothing loads.
    path = tiny_qwen2(tmp_path, kv_heads=1)
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    if NO_TP:
        with pytest.raises(omnifix.UnsupportedModelError, match="tensor-parallel"):
            omnifix.load_safely(path, parallel="tensor")
        return
    with pytest.raises(InvalidArgumentError, match="tensor_parallel=2") as error:
        omnifix.load_safely(path, parallel="tensor")
    assert error.value.valid == (1,)
    assert not torch.distributed.is_initialized()


def test_outside_torchrun_the_error_says_how_to_start_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tiny_qwen2(tmp_path, kv_heads=2)
    with pytest.raises(InvalidArgumentError, match="torchrun --nproc-per-node"):
        omnifix.load_safely(path, parallel="tensor")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"parallel": "pipeline"}, "parallel='pipeline'"),
        ({"parallel": "tensor", "device": "cpu"}, "device"),
        ({"parallel": "tensor", "allow_offload": True}, "allow_offload"),
    ],
)
def test_parallel_options_that_do_not_apply_are_refused(
    tmp_path: pathlib.Path, options: dict[str, object], named: str
) -> None:
    path = tiny_qwen2(tmp_path, kv_heads=2)
    with pytest.raises(InvalidArgumentError, match=named):
        omnifix.load_safely(path, **options)  # type: ignore[arg-type]
