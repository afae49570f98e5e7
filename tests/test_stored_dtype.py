"""The checkpoint's stored dtypes, read from its safetensors headers without the weights.

Real tiny Llama checkpoints written by ``save_pretrained`` (or by ``safetensors`` itself, for
packed integer weights), planned through the public API and the command line.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers
from safetensors.torch import save_file

import omnifix
from omnifix._compat import AUTO_DTYPE_DEFAULT, dtype_keyword, transformers_at_least

if TYPE_CHECKING:
    from collections.abc import Mapping

SRC = str(Path(omnifix.__file__).parent.parent)
_CONFIG = transformers.LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _llama(dtype: torch.dtype, *, fp32_norms: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_CONFIG).to(dtype)
    if fp32_norms:
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.float()
    return model


def _save(model: torch.nn.Module, path: Path, **kwargs: Any) -> Path:
    """``save_pretrained`` with safetensors, and config.json without its dtype fields."""
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    config = json.loads((path / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _counts(model: torch.nn.Module) -> dict[torch.dtype, int]:
    counts: dict[torch.dtype, int] = {}
    for tensor in model.state_dict().values():
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return counts


def _stored_note(notes: tuple[str, ...] | list[str]) -> str:
    found = [note for note in notes if note.startswith("stored weights")]
    assert len(found) == 1, notes
    return found[0]


def _from_pretrained(path: Path, **kwargs: Any) -> torch.nn.Module:
    model: torch.nn.Module = transformers.LlamaForCausalLM.from_pretrained(path, **kwargs)
    return model


def test_from_pretrained_in_auto_dtype_loads_the_stored_dtype_when_config_names_none(
    tmp_path: Path,
) -> None:
    # config.json names no dtype: from_pretrained(dtype="auto") loads the weights' own dtype,
    # and so must the planned load that patch_from_pretrained puts in its place.
    path = _save(_llama(torch.bfloat16), tmp_path / "bf16")
    auto = {dtype_keyword(): "auto"}
    plain = _from_pretrained(path, **auto)
    with omnifix.patch_from_pretrained():
        planned = _from_pretrained(path, device_map="auto", **auto)
    assert plain.dtype == torch.bfloat16
    assert planned.dtype == plain.dtype


@pytest.mark.skipif(
    not transformers_at_least(AUTO_DTYPE_DEFAULT),
    reason="from_pretrained loads the checkpoint's dtype by default from transformers 5 on",
)
def test_from_pretrained_without_a_dtype_loads_the_stored_dtype(tmp_path: Path) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        path = _save(_llama(dtype), tmp_path / str(dtype))
        plain = _from_pretrained(path)
        with omnifix.patch_from_pretrained():
            planned = _from_pretrained(path, device_map="auto")
        assert plain.dtype == dtype
        assert planned.dtype == dtype


def test_a_plan_states_the_stored_parameters_per_dtype(tmp_path: Path) -> None:
    model = _llama(torch.bfloat16, fp32_norms=True)
    path = _save(model, tmp_path / "mixed")
    counts = _counts(model)
    assert set(counts) == {torch.float32, torch.bfloat16}
    plan = omnifix.plan_placement(path, budgets={0: "1GiB"})
    note = _stored_note(plan.notes)
    assert f"{counts[torch.bfloat16]:,} bfloat16" in note
    assert f"{counts[torch.float32]:,} float32" in note
    assert plan.fits
    # Sharded: the index names the shards, each header is read.
    sharded = _save(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert _stored_note(omnifix.plan_placement(sharded, budgets={0: "1GiB"}).notes) == note
    # The command line shows the same.
    argv = [sys.executable, "-m", "omnifix", "plan", str(path), "--gpu", "1GiB", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)  # noqa: S603
    assert _stored_note(json.loads(done.stdout)["notes"]) == note


def test_a_checkpoint_quantised_by_a_method_omnifix_does_not_size_fits_only_on_the_bound(
    tmp_path: Path,
) -> None:
    path = _save(_llama(torch.bfloat16), tmp_path / "gptq")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (path / "config.json").write_text(json.dumps(config))
    refused = omnifix.plan_placement(path, budgets={0: "1GiB"})
    assert not refused.fits
    assert refused.options[0].kind == "bound"
    assert any("gptq" in note and "not understood" in note for note in refused.notes)
    accepted = omnifix.plan_placement(path, budgets={0: "1GiB"}, accept_bound=True)
    assert accepted.fits


def _packed(path: Path) -> Path:
    """A Llama checkpoint whose linear weights are int8 with a float32 scale per row, and whose
    config.json has no quantization_config (as some hand-made exports are)."""
    model = _llama(torch.bfloat16)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        linear = name.endswith("proj.weight") or name == "lm_head.weight"
        if linear:
            scale = tensor.float().abs().amax(dim=1) / 127
            tensors[name] = (tensor.float() / scale[:, None]).round().to(torch.int8)
            tensors[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            tensors[name] = tensor.contiguous()
    path.mkdir()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(path)
    return path


def test_packed_integer_weights_without_a_quantization_config_fit_only_on_the_bound(
    tmp_path: Path,
) -> None:
    path = _packed(tmp_path / "int8")
    refused = omnifix.plan_placement(path, budgets={0: "1GiB"})
    assert not refused.fits
    assert refused.options[0].kind == "bound"
    unknown = [note for note in refused.notes if note.startswith("not understood")]
    assert any("int8" in note and "quantization_config" in note for note in unknown), unknown
    assert "int8" in _stored_note(refused.notes)
    assert omnifix.plan_placement(path, budgets={0: "1GiB"}, accept_bound=True).fits


def _header(path: Path, header: Mapping[str, Any] | bytes, *, length: int | None = None) -> None:
    data = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(data) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + data)


@pytest.mark.parametrize(
    "broken",
    ["truncated", "too-long", "not-json", "bad-dtype", "missing-shard", "bad-index"],
)
def test_a_corrupt_safetensors_header_is_a_checkpoint_error_naming_the_file(
    tmp_path: Path, broken: str
) -> None:
    path = _save(_llama(torch.bfloat16), tmp_path / broken)
    weights = path / "model.safetensors"
    named = "model.safetensors"
    if broken == "truncated":
        weights.write_bytes(weights.read_bytes()[:5])
    elif broken == "too-long":
        _header(
            weights, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, length=1 << 40
        )
    elif broken == "not-json":
        _header(weights, b"{not json")
    elif broken == "bad-dtype":
        _header(weights, {"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}})
    else:
        weights.unlink()
        index = path / "model.safetensors.index.json"
        named = index.name if broken == "bad-index" else "model-00002-of-00002.safetensors"
        text = (
            "not json"
            if broken == "bad-index"
            else json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": named}})
        )
        index.write_text(text)
    with pytest.raises(omnifix.CheckpointError) as caught:
        omnifix.plan_placement(path, budgets={0: "1GiB"})
    message = str(caught.value)
    assert named in message
    assert "\n" not in message
    assert message.endswith("then retry.")
