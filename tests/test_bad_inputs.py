"""The bad-input catalogue: every wrong thing a user may pass, and the error it must get.

Each case is the code a user writes, run as written: it must raise exactly the omnifix error
named (also its builtin base, so ``except ValueError`` keeps working), with a message that names
the offending value and ends with the fix. Nothing escapes raw, nothing is accepted silently.
Where the fix can run on a CPU machine, ``works`` is that fixed call, run too.

docs/errors.md lists the same cases (input, error, fix); ``test_docs_list_the_catalogue``
checks that it does, and writes the list when run with ``OMNIFIX_WRITE_CATALOGUE=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import omnifix
import omnifix.errors
import omnifix.testing
from omnifix import _cli
from omnifix.integrations import xinference

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
BEGIN, END = "<!-- catalogue: begin -->", "<!-- catalogue: end -->"

#: The builtin each error is also, so that callers' existing ``except`` clauses catch it.
BUILTIN: dict[type[Exception], type[Exception]] = {
    omnifix.InvalidArgumentError: ValueError,
    omnifix.DeviceError: ValueError,
    omnifix.DeviceUnavailableError: ValueError,
    omnifix.MetaTensorError: RuntimeError,
    omnifix.InsufficientMemoryError: MemoryError,
    omnifix.UnsupportedModelError: TypeError,
    omnifix.AttentionUnavailableError: ImportError,
    omnifix.CheckpointError: OSError,
}


@dataclass(frozen=True)
class Case:
    """``code`` raises ``error``; the message contains ``names`` and ends with ``fix``."""

    code: str
    error: type[omnifix.OmnifixError]
    names: str
    fix: str
    works: str | None = None  # the fixed call, where it runs on a CPU machine
    needs: str | None = None  # a transformers name the case needs


Invalid = omnifix.InvalidArgumentError
Device = omnifix.DeviceError
Missing = omnifix.DeviceUnavailableError
Meta = omnifix.MetaTensorError
Memory = omnifix.InsufficientMemoryError
Unsupported = omnifix.UnsupportedModelError
Checkpoint = omnifix.CheckpointError


class CommandLine(omnifix.OmnifixError):
    """What the command line shows for a bad input: exit status 2 and one line on stderr.

    The command line prints no error class; the catalogue raises this for its message.
    """


BUILTIN[CommandLine] = Exception

CASES = [
    # normalize_device: spellings, words that are no device, types that are no device.
    Case("omnifix.normalize_device('cdua')", Device, "'cdua'", "Did you mean 'cuda'?"),
    Case("omnifix.normalize_device('cuda0')", Device, "'cuda0'", "Did you mean 'cuda:0'?"),
    Case("omnifix.normalize_device('gpu_1')", Device, "'gpu_1'", "Did you mean 'gpu:1'?"),
    Case(
        "omnifix.normalize_device('cpux')",
        Device,
        "'cpux'",
        "Did you mean 'cpu'?",
        "omnifix.normalize_device('cpu')",
    ),
    Case("omnifix.normalize_device('banana')", Device, "'banana'", "'cuda:<index>'"),
    Case(
        "omnifix.normalize_device('')",
        Device,
        "''",
        "Pass 'auto'",
        "omnifix.normalize_device('auto')",
    ),
    Case("omnifix.normalize_device('   ')", Device, "'   '", "Pass 'auto'"),
    Case("omnifix.normalize_device('meta')", Device, "'meta'", "Pass a real device"),
    Case("omnifix.normalize_device(torch.device('meta'))", Device, "meta", "Pass a real device"),
    Case("omnifix.normalize_device('disk')", Device, "'disk'", "pass a real device"),
    Case("omnifix.normalize_device('balanced')", Device, "'balanced'", "pass a real device"),
    Case("omnifix.normalize_device('sequential')", Device, "'sequential'", "pass a real device"),
    Case(
        "omnifix.normalize_device('auto:0')",
        Device,
        "'auto:0'",
        "Pass 'auto'",
        "omnifix.normalize_device('auto')",
    ),
    Case("omnifix.normalize_device('cuda:-1')", Device, "'cuda:-1'", "Pass 'cuda:0'"),
    Case("omnifix.normalize_device('cuda:x')", Device, "'cuda:x'", "Write e.g. 'cuda:0'"),
    Case("omnifix.normalize_device('cuda:1.5')", Device, "'cuda:1.5'", "Write e.g. 'cuda:0'"),
    Case("omnifix.normalize_device(True)", Device, "True", "'auto'"),
    Case("omnifix.normalize_device(1.5)", Device, "1.5", "'auto'"),
    Case("omnifix.normalize_device(float('nan'))", Device, "nan", "'auto'"),
    Case(
        "omnifix.normalize_device(-1)", Device, "-1", "or 'cpu'", "omnifix.normalize_device('cpu')"
    ),
    Case("omnifix.normalize_device([0])", Device, "[0]", "'auto'"),
    Case("omnifix.normalize_device(b'cuda')", Device, "b'cuda'", "'auto'"),
    Case("omnifix.normalize_device(object)", Device, "object", "'auto'"),
    Case("omnifix.normalize_device(torch.tensor(0.5))", Device, "tensor(0.5000)", "'auto'"),
    Case(
        "omnifix.normalize_device('cuda')",
        Missing,
        "'cuda'",
        "or one listed.",
        "omnifix.normalize_device('auto')",
    ),
    Case("omnifix.normalize_device('cuda:7')", Missing, "'cuda:7'", "or one listed."),
    Case("omnifix.normalize_device(7)", Missing, "7", "or one listed."),
    Case(
        "omnifix.normalize_device('cpu:1')",
        Missing,
        "'cpu:1'",
        "Pass 'cpu' without an index.",
        "omnifix.normalize_device('cpu')",
    ),
    Case("omnifix.normalize_device('mps')", Missing, "'mps'", "or one listed."),
    Case("omnifix.normalize_device('xpu:0')", Missing, "'xpu:0'", "or one listed."),
    Case("omnifix.normalize_device('npu')", Missing, "'npu'", "Install torch_npu"),
    Case("omnifix.normalize_device('rocm')", Missing, "'rocm'", "Install a ROCm build"),
    Case("omnifix.normalize_device('hip:0')", Missing, "'hip:0'", "Install a ROCm build"),
    # resolve_device_map: strategy words pass, maps are checked value by value.
    Case(
        "omnifix.resolve_device_map({})",
        Device,
        "{}",
        "the strategy 'auto'.",
        "omnifix.resolve_device_map({'': 'cpu'})",
    ),
    Case(
        "omnifix.resolve_device_map({0: 'cpu'})",
        Device,
        "0",
        "Use string keys.",
        "omnifix.resolve_device_map({'': 'cpu'})",
    ),
    Case(
        "omnifix.resolve_device_map({'': 'auto'})",
        Device,
        "'auto'",
        "device_map='auto' on its own.",
    ),
    Case("omnifix.resolve_device_map({'': None})", Device, "None", "device_map='auto' on its own."),
    Case("omnifix.resolve_device_map({'model': 'cdua'})", Device, "'cdua'", "Did you mean 'cuda'?"),
    Case("omnifix.resolve_device_map({'model': 'cuda:3'})", Missing, "'cuda:3'", "or one listed."),
    Case("omnifix.resolve_device_map({'model': 'meta'})", Device, "'meta'", "Pass a real device"),
    Case("omnifix.resolve_device_map('disk')", Device, "'disk'", "pass a real device"),
    Case(
        "omnifix.resolve_device_map('sequential:0')", Device, "'sequential:0'", "pass a real device"
    ),
    Case("omnifix.resolve_device_map(['cpu'])", Device, "['cpu']", "'auto'"),
    Case("omnifix.resolve_device_map(2.0)", Device, "2.0", "'auto'"),
    # Model inspection: not a model, never loaded, a class instead of an instance.
    Case("omnifix.input_device(None)", Unsupported, "NoneType", "the result of from_pretrained"),
    Case(
        "omnifix.input_device('Qwen/Qwen2-7B')", Unsupported, "str", "the result of from_pretrained"
    ),
    Case(
        "omnifix.input_device(transformers.Qwen2ForCausalLM)",
        Unsupported,
        "Qwen2ForCausalLM",
        "Qwen2ForCausalLM.from_pretrained).",
    ),
    Case(
        "omnifix.input_device(model().state_dict())",
        Unsupported,
        "OrderedDict",
        "the result of from_pretrained",
    ),
    Case("omnifix.input_device(nn.ReLU())", Unsupported, "ReLU", "weightless wrapper)."),
    Case("omnifix.input_device(meta_linear())", Meta, "Linear", "then ask again."),
    Case("omnifix.input_device(skeleton())", Meta, "Qwen2ForCausalLM", "then ask again."),
    Case(
        "omnifix.input_device(gemma3_skeleton())",
        Meta,
        "Gemma3ForCausalLM",
        "then ask again.",
        needs="Gemma3ForCausalLM",
    ),
    Case(
        "omnifix.input_device(paligemma_skeleton())",
        Meta,
        "PaliGemmaForConditionalGeneration",
        "then ask again.",
        needs="PaliGemmaForConditionalGeneration",
    ),
    Case("omnifix.assert_no_meta(None)", Unsupported, "NoneType", "the result of from_pretrained"),
    Case("omnifix.assert_no_meta('model')", Unsupported, "str", "the result of from_pretrained"),
    Case(
        "omnifix.assert_no_meta(model().state_dict())",
        Unsupported,
        "OrderedDict",
        "the result of from_pretrained",
    ),
    Case(
        "omnifix.assert_no_meta(transformers.Qwen2ForCausalLM)",
        Unsupported,
        "Qwen2ForCausalLM",
        "Qwen2ForCausalLM.from_pretrained).",
    ),
    Case("omnifix.assert_no_meta(meta_linear())", Meta, "weight", "before use."),
    Case(
        "omnifix.assert_no_meta(meta_linear(), allow_offload=True)", Meta, "weight", "before use."
    ),
    Case("omnifix.assert_no_meta(skeleton())", Meta, "model.embed_tokens.weight", "before use."),
    Case(
        "omnifix.find_meta_tensors(None)", Unsupported, "NoneType", "the result of from_pretrained"
    ),
    Case("omnifix.find_meta_tensors('model')", Unsupported, "str", "the result of from_pretrained"),
    Case(
        "omnifix.find_meta_tensors(model().state_dict())",
        Unsupported,
        "OrderedDict",
        "the result of from_pretrained",
    ),
    Case("omnifix.placement_report(None)", Unsupported, "NoneType", "from_pretrained)."),
    Case("omnifix.placement_report(lm)", Unsupported, "str", "from_pretrained)."),
    Case(
        "omnifix.placement_report(model().state_dict())",
        Unsupported,
        "OrderedDict",
        "from_pretrained).",
    ),
    Case(
        "omnifix.placement_report(model()).usage('cdua')", Device, "'cdua'", "Did you mean 'cuda'?"
    ),
    # pin_embeddings
    Case("omnifix.pin_embeddings(None)", Unsupported, "NoneType", "the result of from_pretrained"),
    Case(
        "omnifix.pin_embeddings(nn.Linear(4, 4))",
        Unsupported,
        "Linear",
        "owns the token embedding.",
    ),
    Case(
        "omnifix.pin_embeddings(model(), device='cdua')", Device, "'cdua'", "Did you mean 'cuda'?"
    ),
    Case("omnifix.pin_embeddings(model(), device='meta')", Device, "'meta'", "Pass a real device"),
    Case("omnifix.pin_embeddings(model(), device='cuda:7')", Missing, "'cuda:7'", "or one listed."),
    Case(
        "omnifix.pin_embeddings(model(), device='balanced')",
        Device,
        "'balanced'",
        "pass a real device",
    ),
    Case("pinned(device='cpu')", Device, "device=None", "pin with device=None."),
    # lean_dispatch: maps are checked against the model before anything moves.
    Case("omnifix.lean_dispatch(None)", Unsupported, "NoneType", "the result of from_pretrained"),
    Case(
        "omnifix.lean_dispatch(model(), device_map='auto')",
        Invalid,
        "'auto'",
        "device_map=None to use model.hf_device_map.",
    ),
    Case("omnifix.lean_dispatch(model(), device_map={})", Device, "{}", "the strategy 'auto'."),
    Case(
        "omnifix.lean_dispatch(model(), device_map={'model': 'cpu'})",
        Invalid,
        "'lm_head'",
        "model.named_modules()",
        "omnifix.lean_dispatch(model(), device_map={'model': 'cpu', 'lm_head': 'cpu'})",
    ),
    Case(
        "omnifix.lean_dispatch(model(), device_map={'model.layers.0': 'cpu', 'lm_head': 'cpu'})",
        Invalid,
        "'model.embed_tokens'",
        "model.named_modules()",
    ),
    Case(
        "omnifix.lean_dispatch(model(), device_map={'': 'cpu', 'decoder': 'cpu'})",
        Invalid,
        "'decoder'",
        "model.named_modules()",
        "omnifix.lean_dispatch(model(), device_map={'': 'cpu'})",
    ),
    Case(
        "omnifix.lean_dispatch(model(), device_map={'': 'cpu', 'model.layer.0': 'cpu'})",
        Invalid,
        "'model.layer.0'",
        "'model.layers.0'",
    ),
    Case(
        "omnifix.lean_dispatch(model(), device_map={'': 'disk'})",
        Invalid,
        "disk",
        "without 'cpu'/'disk' entries.",
    ),
    Case(
        "omnifix.lean_dispatch(model(), device_map={'': 'cdua'})",
        Device,
        "'cdua'",
        "Did you mean 'cuda'?",
    ),
    Case(
        "omnifix.lean_dispatch(model(), device_map={'': 'cuda:5'})",
        Missing,
        "'cuda:5'",
        "or one listed.",
    ),
    Case("omnifix.lean_dispatch(model(), device_map={'': 0.5})", Device, "0.5", "'auto'"),
    Case("omnifix.lean_dispatch(meta_linear())", Invalid, "Linear", "load_checkpoint_and_dispatch"),
    Case(
        "omnifix.lean_dispatch(skeleton())",
        Invalid,
        "model.embed_tokens",
        "load_checkpoint_and_dispatch",
    ),
    # load_safely: what to load.
    Case(
        "omnifix.load_safely(None)",
        Invalid,
        "None",
        "'Qwen/Qwen2.5-VL-7B-Instruct'.",
        "omnifix.load_safely(lm, device='cpu')",
    ),
    Case("omnifix.load_safely(42)", Invalid, "42", "'Qwen/Qwen2.5-VL-7B-Instruct'."),
    Case("omnifix.load_safely('')", Checkpoint, "''", "save_pretrained"),
    Case("omnifix.load_safely(missing_dir)", Checkpoint, "does-not-exist", "save_pretrained"),
    Case(
        "omnifix.load_safely(config_file)",
        Checkpoint,
        "config.json",
        "the folder that holds it",
        "omnifix.load_safely(lm, device='cpu')",
    ),
    Case("omnifix.load_safely(empty_dir)", Checkpoint, "empty", "save_pretrained"),
    Case("omnifix.load_safely(lm, subfolder='nope')", Checkpoint, "nope", "save_pretrained"),
    Case("omnifix.load_safely(broken_config_dir)", Checkpoint, "broken-config", "save_pretrained"),
    Case(
        "omnifix.load_safely(bad_index_dir, device='cpu')",
        Checkpoint,
        "bad-index",
        "download or copy the checkpoint again",
    ),
    Case(
        "omnifix.load_safely(corrupt_dir, device='cpu')",
        Checkpoint,
        "model.safetensors",
        "download or copy the checkpoint again",
    ),
    Case(
        "omnifix.load_safely(no_weights_dir, device='cpu')",
        Checkpoint,
        "no-weights",
        "download or copy the checkpoint again",
    ),
    Case(
        "omnifix.load_safely(lm, model_class='Qwen2ForCausalLM')",
        Invalid,
        "'Qwen2ForCausalLM'",
        "model_class=transformers.Qwen2ForCausalLM",
        "omnifix.load_safely(lm, model_class=transformers.Qwen2ForCausalLM, device='cpu')",
    ),
    Case("omnifix.load_safely(lm, model_class=nn.Linear)", Invalid, "Linear", "model_class=None"),
    Case(
        "omnifix.load_safely(lm, model_class=model())",
        Invalid,
        "Qwen2ForCausalLM",
        "model_class=None",
    ),
    Case(
        "omnifix.load_safely(lm, model_class=transformers.LlamaForCausalLM, device='cpu')",
        Unsupported,
        "LlamaForCausalLM",
        "model_class=None",
        "omnifix.load_safely(lm, model_class=None, device='cpu')",
    ),
    Case(
        "omnifix.load_safely(lm, model_class=transformers.BertModel, device='cpu')",
        Unsupported,
        "BertModel",
        "model_class=None",
    ),
    Case(
        "omnifix.load_safely(lm, model_class=transformers.Qwen2VLModel, device='cpu')",
        Unsupported,
        "Qwen2VLModel",
        "model_class=None",
    ),
    Case(
        "omnifix.load_safely(lm, model_class=transformers.AutoModelForImageClassification)",
        Unsupported,
        "AutoModelForImageClassification",
        "model_class=transformers.Qwen2ForCausalLM",
    ),
    # load_safely: where and how.
    Case("omnifix.load_safely(lm, device='cdua')", Device, "'cdua'", "Did you mean 'cuda'?"),
    Case("omnifix.load_safely(lm, device='cuda:7')", Missing, "'cuda:7'", "or one listed."),
    Case("omnifix.load_safely(lm, device='meta')", Device, "'meta'", "Pass a real device"),
    Case("omnifix.load_safely(lm, device='mps')", Missing, "'mps'", "or one listed."),
    Case("omnifix.load_safely(lm, device='balanced')", Device, "'balanced'", "pass a real device"),
    Case(
        "omnifix.load_safely(lm, dtype='float33')",
        Invalid,
        "'float33'",
        "Did you mean 'float32'?",
        "omnifix.load_safely(lm, dtype='bfloat16', device='cpu')",
    ),
    Case("omnifix.load_safely(lm, dtype=42)", Invalid, "42", "torch.bfloat16"),
    Case("omnifix.load_safely(lm, dtype=torch.int8)", Invalid, "int8", "or 'auto'."),
    Case(
        "omnifix.load_safely(lm, attn_implementation='flash')",
        Invalid,
        "'flash'",
        "'sdpa'",
        "omnifix.load_safely(lm, attn_implementation='sdpa', device='cpu')",
    ),
    Case("omnifix.load_safely(lm, attn_implementation=42)", Invalid, "42", "'sdpa'"),
    Case(
        "omnifix.load_safely(lm, max_memory='10GiB')",
        Invalid,
        "'10GiB'",
        "{'cpu': '10GiB'}",
        "omnifix.load_safely(lm, max_memory={'cpu': '10GiB'}, device='cpu')",
    ),
    Case("omnifix.load_safely(lm, max_memory=['10GiB'])", Invalid, "['10GiB']", "{'cpu': '10GiB'}"),
    Case(
        "omnifix.load_safely(lm, max_memory={'cpu': 0}, device='cpu')",
        Memory,
        "max_memory={'cpu': 0}",
        "drop max_memory=",
        "omnifix.load_safely(lm, device='cpu')",
    ),
    Case(
        "omnifix.load_safely(lm, max_memory={'cpu': 'nan'}, device='cpu')",
        Invalid,
        "'nan'",
        "'24GiB'",
    ),
    Case(
        "omnifix.load_safely(lm, max_memory={'cpu': float('nan')}, device='cpu')",
        Invalid,
        "nan",
        "'24GiB'",
    ),
    Case(
        "omnifix.load_safely(lm, max_memory={'cpu': float('inf')}, device='cpu')",
        Invalid,
        "inf",
        "'24GiB'",
    ),
    Case("omnifix.load_safely(lm, max_memory={'cpu': -1}, device='cpu')", Invalid, "-1", "'24GiB'"),
    Case(
        "omnifix.load_safely(lm, max_memory={'cpu': '10 potatoes'}, device='cpu')",
        Invalid,
        "'10 potatoes'",
        "'24GiB'",
    ),
    Case(
        "omnifix.load_safely(lm, max_memory={'cpu': '1024'}, device='cpu')",
        Invalid,
        "'1024'",
        "pass 1024 (an int counts bytes)",
    ),
    Case(
        "omnifix.load_safely(lm, max_memory={'cpu': True}, device='cpu')",
        Invalid,
        "True",
        "'24GiB'",
    ),
    Case(
        "omnifix.load_safely(lm, max_memory={0: '10GiB'}, device='cpu')",
        Invalid,
        "0",
        "Drop that entry",
        "omnifix.load_safely(lm, device='cpu')",
    ),
    Case(
        "omnifix.load_safely(lm, max_memory={'cdua': '1GiB'}, device='cpu')",
        Device,
        "'cdua'",
        "Did you mean 'cuda'?",
    ),
    Case("omnifix.load_safely(lm, workload=5)", Invalid, "5", "Workload(text_tokens=8192"),
    Case(
        "omnifix.load_safely(lm, workload={'text_tokens': 64})",
        Invalid,
        "'text_tokens'",
        "Workload(text_tokens=8192",
    ),
    Case("omnifix.load_safely(lm, hooks='none')", Invalid, "'none'", 'hooks="accelerate"'),
    Case(
        "omnifix.load_safely(lm, output_loading_info=True)",
        Invalid,
        "output_loading_info=True",
        "assert_no_meta.",
    ),
    Case(
        "omnifix.load_safely(lm, dtype='float16', torch_dtype='bfloat16')",
        Invalid,
        "'float16'",
        "expects).",
    ),
    Case("omnifix.load_safely(lm, allow_offload='yes')", Invalid, "'yes'", "allow_offload=True"),
    Case("omnifix.load_safely(lm, strict='no')", Invalid, "'no'", "strict=True"),
    # load_safely: explicit maps, checked against the checkpoint's model before loading.
    Case(
        "omnifix.load_safely(lm, device_map='auto')",
        Invalid,
        "'auto'",
        "to place modules yourself.",
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'model': 'cpu'})",
        Invalid,
        "'lm_head'",
        "model.named_modules()",
        "omnifix.load_safely(lm, device_map={'model': 'cpu', 'lm_head': 'cpu'})",
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'model.layers': 'cpu', 'lm_head': 'cpu'})",
        Invalid,
        "'model.embed_tokens'",
        "model.named_modules()",
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'': 'cpu', 'vision_tower': 'cpu'})",
        Invalid,
        "'vision_tower'",
        "model.named_modules()",
        "omnifix.load_safely(lm, device_map={'': 'cpu'})",
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'': 'cpu', 'model.layers.9': 'cpu'})",
        Invalid,
        "'model.layers.9'",
        "model.named_modules()",
    ),
    Case(
        "omnifix.load_safely(tied, device_map={'model': 'cpu', 'lm_head': 'disk'}, allow_offload=True)",  # noqa: E501
        Device,
        "lm_head",
        "map both to the same device",
        "omnifix.load_safely(tied, device_map={'': 'cpu'})",
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'': 'disk'})", Invalid, "'disk'", "allow_offload=True"
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'': 'cpu'}, device='cuda:0')",
        Invalid,
        "'cuda:0'",
        "let load_safely plan.",
        "omnifix.load_safely(lm, device_map={'': 'cpu'})",
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'': 'cpu'}, max_memory={'cpu': '1GiB'})",
        Invalid,
        "max_memory",
        "let load_safely plan.",
    ),
    Case("omnifix.load_safely(lm, device_map={1: 'cpu'})", Device, "1", "Use string keys."),
    Case(
        "omnifix.load_safely(lm, device_map={'': 'auto'})",
        Device,
        "'auto'",
        "device_map='auto' on its own.",
    ),
    Case(
        "omnifix.load_safely(lm, device_map={'': 'cuda:3'})", Missing, "'cuda:3'", "or one listed."
    ),
    # plan_placement
    Case(
        "omnifix.plan_placement('qwen3-vl-999b')",
        Unsupported,
        "'qwen3-vl-999b'",
        "Did you mean 'qwen3-vl-8b'?",
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '24GiB'})",
    ),
    Case("omnifix.plan_placement(None)", Unsupported, "None", "model built on the meta device."),
    Case("omnifix.plan_placement(42)", Unsupported, "42", "model built on the meta device."),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets='24GiB')",
        Invalid,
        "'24GiB'",
        "{0: '24GiB', 1: '24GiB'}",
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '24GiB'})",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={})",
        Invalid,
        "{}",
        "None to measure this machine.",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: 'lots'})", Invalid, "'lots'", "'24GiB'"
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: float('nan')})",
        Invalid,
        "nan",
        "'24GiB'",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: float('inf')})",
        Invalid,
        "inf",
        "'24GiB'",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '-1GiB'})", Invalid, "'-1GiB'", "'24GiB'"
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '24'})",
        Invalid,
        "'24'",
        "'24GiB'.",
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '24GiB'})",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={'mps': '8GiB'})", Device, "'mps'", "'disk'"
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={'cdua': '8GiB'})",
        Device,
        "'cdua'",
        "Did you mean 'cuda'?",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '8GiB', 'cuda:0': '8GiB'})",
        Invalid,
        "'cuda:0'",
        "Give each device once.",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '24GiB'}, dtype='float33')",
        Invalid,
        "'float33'",
        "Did you mean 'float32'?",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '24GiB'}, attn_implementation='flash')",
        Invalid,
        "'flash'",
        "'sdpa'",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '24GiB'}, workload=5)",
        Invalid,
        "5",
        "Workload(text_tokens=8192",
    ),
    Case(
        "omnifix.plan_placement('qwen2-vl-7b', budgets={0: '8GiB'}).raise_if_refused()",
        Memory,
        "8.0 GiB",
        "free memory on the GPUs.",
    ),
    Case("omnifix.plan_placement(empty_dir)", Checkpoint, "empty", "save_pretrained"),
    Case(
        "omnifix.plan_placement(corrupt_dir)",
        Checkpoint,
        "corrupt/model.safetensors",
        "download or copy the checkpoint again",
    ),
    Case(
        "omnifix.plan_placement(truncated_dir)",
        Checkpoint,
        "truncated/model.safetensors",
        "download or copy the checkpoint again",
    ),
    Case(
        "omnifix.plan_placement(bad_index_dir)",
        Checkpoint,
        "model.safetensors.index.json",
        "download or copy the checkpoint again",
    ),
    Case(
        "omnifix.plan_placement(missing_shard_dir)",
        Checkpoint,
        "model-00002-of-00002.safetensors",
        "download or copy the checkpoint again",
    ),
    Case(
        "cli('plan', truncated_dir, '--gpu', '1GiB')",
        CommandLine,
        "truncated/model.safetensors",
        "download or copy the checkpoint again",
    ),
    # Workload
    Case(
        "omnifix.Workload(batch_size=0)",
        Invalid,
        "batch_size=0",
        "Pass a number >= 1.",
        "omnifix.Workload(batch_size=1)",
    ),
    Case("omnifix.Workload(text_tokens=-1)", Invalid, "text_tokens=-1", "Pass a number >= 0."),
    Case(
        "omnifix.Workload(text_tokens=1.5)",
        Invalid,
        "text_tokens=1.5",
        "text_tokens=2.",
        "omnifix.Workload(text_tokens=2)",
    ),
    Case(
        "omnifix.Workload(text_tokens='512')", Invalid, "text_tokens='512'", "Pass a number >= 0."
    ),
    Case("omnifix.Workload(batch_size=True)", Invalid, "batch_size=True", "Pass a number >= 1."),
    Case(
        "omnifix.Workload(max_new_tokens=None)",
        Invalid,
        "max_new_tokens=None",
        "Pass a number >= 0.",
    ),
    Case(
        "omnifix.Workload(video_seconds=float('nan'))",
        Invalid,
        "video_seconds=nan",
        "Pass a finite number >= 0.",
    ),
    Case(
        "omnifix.Workload(audio_seconds=float('inf'))",
        Invalid,
        "audio_seconds=inf",
        "Pass a finite number >= 0.",
    ),
    Case(
        "omnifix.Workload(video_seconds=-2.0)", Invalid, "video_seconds=-2.0", "Pass a number >= 0."
    ),
    Case(
        "omnifix.Workload(video_tokens_per_second=0)",
        Invalid,
        "video_tokens_per_second=0",
        "Pass a number >= 1.",
    ),
    Case(
        "omnifix.Workload(audio_output='yes')", Invalid, "audio_output='yes'", "audio_output=True"
    ),
    # patch_from_pretrained: options now, and the loads it routes.
    Case("omnifix.patch_from_pretrained(workload=5)", Invalid, "5", "Workload(text_tokens=8192"),
    Case(
        "omnifix.patch_from_pretrained(allow_offload='no')", Invalid, "'no'", "allow_offload=True"
    ),
    Case("patched_load(lm, device_map='cdua')", Device, "'cdua'", "Did you mean 'cuda'?"),
    Case("patched_load(lm, device_map='cuda:7')", Missing, "'cuda:7'", "or one listed."),
    Case(
        "patched_load(lm, device_map={'model': 'cpu'})",
        Invalid,
        "'lm_head'",
        "model.named_modules()",
        "patched_load(lm, device_map={'': 'cpu'})",
    ),
    # The command line: an omnifix error on stderr and exit status 2, never a traceback.
    Case(
        "cli('plan', 'qwen2-vl-7b', '--video', 'nan')",
        CommandLine,
        "--video 'nan'",
        "pass seconds, 0 or more, such as 10 or 2.5.",
        "cli('plan', 'qwen2-vl-7b', '--video', '10', '--gpu', '80GiB')",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--audio', 'inf')",
        CommandLine,
        "--audio 'inf'",
        "pass seconds, 0 or more, such as 10 or 2.5.",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--video', '-1')",
        CommandLine,
        "--video '-1'",
        "pass seconds, 0 or more, such as 10 or 2.5.",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--batch', '0')",
        CommandLine,
        "--batch '0'",
        "pass a whole number, 1 or more, such as 4.",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--text', '-5')",
        CommandLine,
        "--text '-5'",
        "pass a whole number, 0 or more, such as 512.",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--gpu', '0')",
        CommandLine,
        "--gpu '0'",
        "pass a size such as 24GiB or 80GB.",
        "cli('plan', 'qwen2-vl-7b', '--gpu', '24GiB')",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--gpu', 'lots')",
        CommandLine,
        "--gpu 'lots'",
        "pass a size such as 24GiB or 80GB.",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--cpu', 'nan')",
        CommandLine,
        "--cpu 'nan'",
        "pass a size such as 24GiB or 80GB.",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--gpu', '24GiB', '--dtype', 'float33')",
        CommandLine,
        "--dtype 'float33'",
        "pass one of auto, bfloat16, float16, float32.",
    ),
    Case(
        "cli('plan', 'qwen2-vl-7b', '--gpu', '24GiB', '--attn', 'flash')",
        CommandLine,
        "'flash'",
        "'sdpa'",
    ),
    Case(
        "cli('plan', 'qwen3-vl-999b')",
        CommandLine,
        "'qwen3-vl-999b'",
        "Did you mean 'qwen3-vl-8b'?",
    ),
    Case("cli('plan', empty_dir)", CommandLine, "empty", "save_pretrained"),
    Case(
        "cli('plan', config_file, '--gpu', '1GiB', '--video', '5')",
        CommandLine,
        "vision",
        "to 0 for this model.",
        "cli('plan', config_file, '--gpu', '1GiB')",
    ),
    Case(
        "cli('demo', '--family', 'qwen2', '--device', 'cdua')",
        CommandLine,
        "'cdua'",
        "Did you mean 'cuda'?",
    ),
    Case(
        "cli('demo', '--family', 'qwen2', '--device', 'cuda:7')",
        CommandLine,
        "'cuda:7'",
        "or one listed.",
        "cli('demo', '--family', 'qwen2', '--device', 'cpu')",
    ),
    Case(
        "cli('demo', '--family', 'qwen2', '--device', 'meta')",
        CommandLine,
        "'meta'",
        "Pass a real device",
    ),
    Case(
        "cli('demo', '--family', 'qwen2', '--max-new-tokens', '-1')",
        CommandLine,
        "--max-new-tokens '-1'",
        "pass a whole number, 0 or more, such as 512.",
    ),
    # Integrations and omnifix.testing.
    Case("xinference.patch_xinference(42)", Invalid, "42", "not instances or module paths."),
    Case(
        "xinference.patch_xinference('Qwen2AudioChatModel')",
        Invalid,
        "'Qwen2AudioChatModel'",
        "not instances or module paths.",
    ),
    Case(
        "xinference.patch_xinference(modules=[types.ModuleType('utils')])",
        Invalid,
        "utils",
        "imported select_device.",
    ),
    Case("xinference.patch_xinference(workload=5)", Invalid, "5", "Workload(text_tokens=8192"),
    Case("xinference_select('cdua')", Device, "'cdua'", "Did you mean 'cuda'?"),
    Case(
        "xinference_select('cuda:9')",
        Missing,
        "'cuda:9'",
        "or one listed.",
        "xinference_select('cpu')",
    ),
    Case("omnifix.testing.tiny_model('llama')", Unsupported, "'llama'", "qwen2"),
    Case("omnifix.testing.tiny_config('qwen-2')", Unsupported, "'qwen-2'", "qwen2"),
    Case("omnifix.testing.save_tiny_model('llama', empty_dir)", Unsupported, "'llama'", "qwen2"),
]


def write_checkpoints(root: Path) -> dict[str, str]:
    """Tiny checkpoints, good and broken, under ``root``."""
    lm = omnifix.testing.save_tiny_model("qwen2", root / "lm")
    tied_model = omnifix.testing.tiny_model("qwen2")
    tied_model.config.tie_word_embeddings = True
    tied_model.tie_weights()
    tied_model.save_pretrained(root / "tied")
    (root / "empty").mkdir()
    broken = root / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for name in ("bad-index", "corrupt", "no-weights", "truncated", "missing-shard"):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text((lm / "config.json").read_text())
    (root / "bad-index" / "model.safetensors.index.json").write_text("not json")
    (root / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 64)
    header = (lm / "model.safetensors").read_bytes()[:5]
    (root / "truncated" / "model.safetensors").write_bytes(header)
    shard = "model-00002-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": {"lm_head.weight": shard}}
    (root / "missing-shard" / "model.safetensors.index.json").write_text(json.dumps(index))
    return {
        "lm": str(lm),
        "tied": str(root / "tied"),
        "empty_dir": str(root / "empty"),
        "missing_dir": str(root / "does-not-exist"),
        "config_file": str(lm / "config.json"),
        "broken_config_dir": str(broken),
        "bad_index_dir": str(root / "bad-index"),
        "corrupt_dir": str(root / "corrupt"),
        "no_weights_dir": str(root / "no-weights"),
        "truncated_dir": str(root / "truncated"),
        "missing_shard_dir": str(root / "missing-shard"),
    }


class Names(dict[str, Any]):
    """The names the cases use; the checkpoints are written when a case first names one."""

    def __init__(self, names: dict[str, Any], root: Path) -> None:
        super().__init__(names)
        self.root = root

    def __missing__(self, key: str) -> Any:
        if "lm" in self:  # written already: the name is unknown
            raise KeyError(key)
        self.update(write_checkpoints(self.root))
        return self[key]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Names:
    """The names the cases use: tiny checkpoints (good and broken), models, helpers."""
    root = tmp_path_factory.mktemp("catalogue")

    def model() -> nn.Module:
        return omnifix.testing.tiny_model("qwen2")

    def meta_linear() -> nn.Module:
        with torch.device("meta"):
            return nn.Linear(4, 2)

    def skeleton() -> nn.Module:
        with init_empty_weights():
            return transformers.Qwen2ForCausalLM(omnifix.testing.tiny_config("qwen2"))

    def gemma3_skeleton() -> nn.Module:
        text = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "head_dim": 8}
        text |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
        with init_empty_weights():
            return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**text))

    def paligemma_skeleton() -> nn.Module:
        text = {"model_type": "gemma", "vocab_size": 300, "hidden_size": 16, "head_dim": 8}
        text |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
        vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
        vision |= {"num_attention_heads": 2, "image_size": 28, "patch_size": 14}
        config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision)
        with init_empty_weights():
            return transformers.PaliGemmaForConditionalGeneration(config)

    def pinned(*, device: str) -> omnifix.types.EmbeddingPin:
        target = model()
        omnifix.pin_embeddings(target)
        return omnifix.pin_embeddings(target, device=device)

    def patched_load(path: Path, **kwargs: Any) -> nn.Module:
        with omnifix.patch_from_pretrained():
            return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)

    def xinference_select(device: str) -> str:
        utils = types.ModuleType("utils")
        utils.select_device = lambda value: value  # type: ignore[attr-defined]
        with xinference.patch_xinference(modules=[utils]):
            return str(utils.select_device(device))  # type: ignore[attr-defined]

    names = {
        "omnifix": omnifix,
        "torch": torch,
        "nn": nn,
        "transformers": transformers,
        "types": types,
        "xinference": xinference,
        "model": model,
        "meta_linear": meta_linear,
        "skeleton": skeleton,
        "gemma3_skeleton": gemma3_skeleton,
        "paligemma_skeleton": paligemma_skeleton,
        "pinned": pinned,
        "patched_load": patched_load,
        "xinference_select": xinference_select,
        "cli": cli,
    }
    return Names(names, root)


def cli(*argv: str) -> int:
    """``omnifix ARGV``; an omnifix error it reports (exit 2) is raised again, here, as itself."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = _cli.main(list(argv))
        except SystemExit as exited:  # argparse's own errors exit from parse_args
            status = int(exited.code or 0)
    text = err.getvalue()
    assert "Traceback" not in text
    if status == 2:  # the command line's "bad arguments": one line, then perhaps where help is
        first, *rest = text.strip().splitlines()
        assert rest in ([], [f"Run 'omnifix {argv[0]} --help' for the options."]), text
        prefix, message = first.split(": ", 1)
        assert prefix == f"omnifix {argv[0]}"
        raise CommandLine(message)
    return status


def run(code: str, env: Names) -> object:
    return eval(code, {}, env)  # noqa: S307 - the catalogue's own code, as docs/errors.md shows it


@pytest.mark.parametrize("case", CASES, ids=[case.code for case in CASES])
def test_bad_input_gets_its_error_naming_the_value_and_the_fix(case: Case, env: Names) -> None:
    if case.needs is not None and not hasattr(transformers, case.needs):
        pytest.skip(f"transformers {transformers.__version__} has no {case.needs}")
    with pytest.raises(omnifix.OmnifixError) as caught:
        run(case.code, env)
    error = caught.value
    message = str(error)
    assert type(error) is case.error, message
    assert isinstance(error, BUILTIN[case.error])
    assert case.names in message, message
    assert message.rstrip().endswith((".", "?", ")")), message
    assert case.fix in message[-max(400, len(case.fix) + 100) :], message
    if case.works is not None:
        run(case.works, env)


def test_the_catalogue_is_large_and_has_no_duplicates() -> None:
    codes = [case.code for case in CASES]
    assert len(set(codes)) == len(codes)
    assert len(codes) >= 120
    assert {case.error for case in CASES} >= set(BUILTIN) - {omnifix.AttentionUnavailableError}


def test_every_public_function_is_in_the_catalogue() -> None:
    functions = {
        name
        for name in omnifix.__all__
        if callable(getattr(omnifix, name)) and not isinstance(getattr(omnifix, name), type)
    }
    missing = {name for name in functions if not any(f"omnifix.{name}(" in c.code for c in CASES)}
    assert not missing


def catalogue_markdown() -> str:
    """The catalogue as docs/errors.md lists it: input, error (builtin), fix."""
    rows = ["| input | error | fix |", "|---|---|---|"]
    for case in CASES:
        error = (
            "exit status 2, one line on stderr"
            if case.error is CommandLine
            else f"`{case.error.__name__}` ({BUILTIN[case.error].__name__})"
        )
        fix = f"`{case.works}`" if case.works else f"message ends: {case.fix!r}"
        rows.append(f"| `{case.code}` | {error} | {fix.replace('|', '/')} |")
    return "\n".join(rows)


def test_docs_list_the_catalogue() -> None:
    text = DOCS.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    expected = f"{head}{BEGIN}\n{catalogue_markdown()}\n{END}{tail}"
    if os.environ.get("OMNIFIX_WRITE_CATALOGUE") == "1":
        DOCS.write_text(expected)
    assert BEGIN in text, f"docs/errors.md lacks {BEGIN}"
    assert text == expected, "Run OMNIFIX_WRITE_CATALOGUE=1 pytest tests/test_bad_inputs.py"


# Properties: whatever is typed, a sound result or an omnifix error naming it; never anything else.

DEVICE_WORDS = ["auto", "cpu", "cuda", "gpu", "mps", "xpu", "npu", "rocm", "hip", "meta", "disk"]
device_text = st.builds(
    "{}{}{}{}{}".format,
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from([*DEVICE_WORDS, "balanced", "cdua", "Cuda", "CPU", "hpu", "x"]),
    st.sampled_from(["", ":", "-", "_", " ", "::"]),
    st.sampled_from(["", "0", "1", "7", "-1", "01", "1.5", "x", "99999999999999999999"]),
    st.sampled_from(["", " ", "\n"]),
)


@settings(max_examples=10_000, deadline=None)
@given(st.one_of(st.text(), device_text))
def test_any_device_string_is_a_real_device_or_a_device_error_naming_it(text: str) -> None:
    try:
        device = omnifix.normalize_device(text)
    except omnifix.DeviceError as caught:
        error: Exception = caught
    else:
        assert omnifix.normalize_device(device) == device
        assert torch.empty(0, device=device).device == device
        return
    assert repr(text) in str(error)


UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
sizes = st.one_of(
    st.integers(-(2**40), 2**50),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.builds("{}{}".format, st.integers(-4, 4096), st.sampled_from([*UNITS, "", "TB", "gib"])),
    st.none(),
    st.booleans(),
)


def expected_bytes(value: object) -> int | None:
    """What a size means, written out here apart from omnifix's parser; ``None``: not a size."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value >= 0 and value != float("inf") else None
    for unit, factor in UNITS.items():
        number = str(value).removesuffix(unit)
        if number != value and number.lstrip("-").isdecimal():
            return int(number) * factor if int(number) >= 0 else None
    return None


@settings(max_examples=300, deadline=None)
@given(sizes)
@example("\N{SUPERSCRIPT ONE}")  # a digit to str.isdigit, not to int()
@example("\N{ARABIC-INDIC DIGIT THREE}GiB")
def test_a_budget_is_the_size_it_says_or_an_error_naming_it(value: object) -> None:
    config = omnifix.testing.tiny_config("qwen2")
    expected = expected_bytes(value)
    try:
        plan = omnifix.plan_placement(
            config, model_class=transformers.Qwen2ForCausalLM, budgets={"cpu": value}
        )
    except omnifix.InvalidArgumentError as caught:
        error: Exception = caught
    else:
        assert plan.devices[0].device == "cpu"
        assert expected is None or plan.devices[0].budget == expected
        assert plan.devices[0].budget >= 0
        return
    assert type(error) is omnifix.InvalidArgumentError
    assert f"budgets['cpu']={value!r}" in str(error)
    assert expected is None


counts = st.one_of(
    st.integers(-3, 10**5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)


@settings(max_examples=500, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "batch_size": counts,
            "text_tokens": counts,
            "image_tokens": counts,
            "video_seconds": counts,
            "audio_seconds": counts,
            "max_new_tokens": counts,
            "video_tokens_per_second": counts,
            "audio_output": st.one_of(st.booleans(), st.none(), st.text(max_size=3)),
        },
    )
)
def test_a_workload_is_sound_or_an_error_naming_the_field(fields: dict[str, Any]) -> None:
    try:
        work = omnifix.Workload(**fields)
    except omnifix.InvalidArgumentError as caught:
        error: Exception = caught
    else:
        assert_sound(work, fields)
        return
    assert type(error) is omnifix.InvalidArgumentError
    assert any(f"{name}={value!r}" in str(error) for name, value in fields.items())


def assert_sound(work: omnifix.Workload, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        assert getattr(work, name) == value
    assert isinstance(work.audio_output, bool)
    assert work.batch_size >= 1
    assert work.video_tokens_per_second >= 1
    assert work.prompt_tokens >= work.text_tokens >= 0
    assert math.isfinite(work.video_seconds)
    assert math.isfinite(work.audio_seconds)
    assert str(work).startswith(f"batch {work.batch_size} x ")
