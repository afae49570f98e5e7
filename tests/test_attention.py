"""dtype and attention choice: pure functions fed with simulated GPUs, checked against transformers.

The machine has no GPU, so GPU facts (compute capability, installed kernels) are arguments here;
what transformers itself does with the result is checked by real loads in test_load.py.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifix
from omnifix import AttentionUnavailableError
from omnifix._attention import (
    choose_attention,
    choose_dtype,
    gpu_capabilities,
    installed_attention,
    parse_dtype,
    supported_attention,
)
from omnifix._compat import dtype_keyword

H100, A100, T4, V100 = (9, 0), (8, 0), (7, 5), (7, 0)
EVERYTHING = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3"})
capabilities = st.lists(st.tuples(st.integers(5, 10), st.integers(0, 9)), max_size=4)
half_or_full = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


# --- dtype ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        (" torch.float16 ", torch.float16),
        ("half", torch.float16),
        ("fp32", torch.float32),
        ("float", torch.float32),
        (torch.bfloat16, torch.bfloat16),
        ("auto", None),
    ],
)
def test_parse_dtype_names(name: str | torch.dtype, expected: torch.dtype | None) -> None:
    assert parse_dtype(name) is expected


@pytest.mark.parametrize("bad", ["int8", "bfloat", "", torch.int8, 16])
def test_parse_dtype_refuses_what_is_no_floating_dtype(bad: object) -> None:
    with pytest.raises(omnifix.InvalidArgumentError) as raised:
        parse_dtype(bad)  # type: ignore[arg-type]
    message = str(raised.value)
    assert repr(bad) in message or str(bad) in message
    assert message.endswith(("(or their names).", "or 'auto'."))


def test_parse_dtype_suggests_the_closest_name() -> None:
    with pytest.raises(omnifix.InvalidArgumentError, match="Did you mean 'bfloat16'"):
        parse_dtype("bfloat61")


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ([], torch.float32),  # the cpu
        ([H100], torch.bfloat16),
        ([A100, H100], torch.bfloat16),
        ([T4], torch.float16),
        ([H100, V100], torch.float16),  # one old GPU decides for the whole model
    ],
)
def test_auto_dtype_follows_the_weakest_gpu(
    gpus: list[tuple[int, int]], expected: torch.dtype
) -> None:
    assert choose_dtype("auto", capabilities=gpus) is expected


@given(gpus=capabilities, asked=st.sampled_from(["auto", "fp16", "bf16", "fp32"]))
def test_choose_dtype_rule(gpus: list[tuple[int, int]], asked: str) -> None:
    chosen = choose_dtype(asked, capabilities=gpus)
    if asked != "auto":
        assert chosen is parse_dtype(asked)  # what the caller asks for is kept, on any GPU
    elif not gpus:
        assert chosen is torch.float32
    elif all(gpu >= (8, 0) for gpu in gpus):
        assert chosen is torch.bfloat16
    else:
        assert chosen is torch.float16


def test_gpu_capabilities_skips_non_cuda_devices() -> None:
    assert gpu_capabilities([torch.device("cpu"), torch.device("meta")]) == ()


def test_dtype_keyword_is_the_one_from_pretrained_loads_with(tiny_lm_dir) -> None:
    """Loaded with our keyword: the dtype is applied and transformers logs no deprecation."""
    import io
    import logging

    from transformers import AutoModelForCausalLM

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        ours = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, **{dtype_keyword(): torch.float16})
        assert "deprecated" not in log.getvalue()
        if dtype_keyword() == "dtype":  # 4.56+: the old name still loads, and says it is deprecated
            old = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, torch_dtype=torch.float16)
            assert old.dtype == torch.float16
            assert "torch_dtype" in log.getvalue()
        else:  # 4.45-4.55: dtype= is no loading option; the model's __init__ refuses it
            with pytest.raises(TypeError, match="dtype"):
                AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float16)
    finally:
        logger.removeHandler(handler)
    assert ours.dtype == torch.float16


# --- attention -----------------------------------------------------------------------------------


def test_installed_attention_matches_transformers_probes() -> None:
    utils = importlib.import_module("transformers.utils")
    found = installed_attention()
    assert {"eager", "sdpa"} <= found
    assert ("flash_attention_2" in found) == bool(utils.is_flash_attn_2_available())
    assert found <= {
        "eager",
        "sdpa",
        "flash_attention_2",
        "flash_attention_3",
        "flash_attention_4",
        "flex_attention",
    }


def test_supported_attention_reads_the_class_flags() -> None:
    from transformers import Qwen2ForCausalLM

    assert {"eager", "sdpa", "flash_attention_2"} <= supported_attention(Qwen2ForCausalLM)

    class EagerOnly(Qwen2ForCausalLM):
        _supports_sdpa = False
        _supports_flash_attn_2 = False
        _supports_flash_attn = False
        _supports_flex_attn = False

    assert supported_attention(EagerOnly) == {"eager"}
    # "auto" must not pick what the model cannot run: eager, silently (nothing was asked).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_attention(dtype=torch.bfloat16, model_class=EagerOnly) == "eager"


@pytest.mark.parametrize(
    ("gpus", "dtype", "installed", "expected"),
    [
        ([H100], torch.bfloat16, EVERYTHING, "flash_attention_2"),
        ([A100, H100], torch.float16, EVERYTHING, "flash_attention_2"),
        ([T4], torch.float16, EVERYTHING, "sdpa"),  # FA2 needs Ampere
        ([H100], torch.float32, EVERYTHING, "sdpa"),  # FA2 needs half precision
        ([H100], torch.bfloat16, {"eager", "sdpa"}, "sdpa"),  # flash-attn not installed
        ([], torch.bfloat16, EVERYTHING, "sdpa"),  # the cpu
    ],
)
def test_auto_attention(
    gpus: list[tuple[int, int]], dtype: torch.dtype, installed: set[str], expected: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" never warns
        assert choose_attention(dtype=dtype, capabilities=gpus, installed=installed) == expected


@given(gpus=capabilities, dtype=half_or_full, has_flash=st.booleans())
@settings(max_examples=60)
def test_auto_picks_flash_exactly_when_everything_allows_it(
    gpus: list[tuple[int, int]], dtype: torch.dtype, has_flash: bool
) -> None:
    installed = EVERYTHING if has_flash else {"eager", "sdpa"}
    allowed = (
        has_flash
        and bool(gpus)
        and min(gpus) >= (8, 0)
        and dtype in (torch.float16, torch.bfloat16)
    )
    chosen = choose_attention(dtype=dtype, capabilities=gpus, installed=installed)
    assert chosen == ("flash_attention_2" if allowed else "sdpa")


def test_missing_flash_attn_falls_back_to_sdpa_with_the_reason() -> None:
    """This machine's real kernels, on a simulated H100 in bf16: flash-attn is not installed."""
    assert "flash_attention_2" not in installed_attention()
    with pytest.warns(omnifix.OmnifixWarning) as caught:
        chosen = choose_attention("flash_attention_2", dtype=torch.bfloat16, capabilities=[H100])
    assert chosen == "sdpa"
    message = str(caught[0].message)
    assert "flash-attn package is not available" in message
    assert "compute capability" not in message  # the H100 and bf16 are fine: only one reason
    assert message.endswith("(or 'auto').")
    assert caught[0].filename == __file__  # the warning points at the caller's line


def test_every_reason_is_given() -> None:
    with pytest.warns(omnifix.OmnifixWarning) as caught:
        choose_attention(
            "flash_attention_2", dtype=torch.float32, capabilities=[T4], installed={"sdpa"}
        )
    message = str(caught[0].message)
    assert "compute capability 8.0 or newer, and one has 7.5" in message
    assert "float16 or bfloat16 only, and the model loads in torch.float32" in message
    assert "not available in this process" in message


def test_strict_raises_an_import_error_omnifix_style() -> None:
    with pytest.raises(AttentionUnavailableError) as raised:
        choose_attention("flash_attention_2", dtype=torch.float32, strict=True)
    error = raised.value
    assert isinstance(error, ImportError)  # what transformers raises for a missing flash-attn
    assert isinstance(error, omnifix.UnsupportedModelError)
    assert "runs on CUDA GPUs only" in str(error)
    assert str(error).endswith("with a warning).")


def test_requested_backend_the_model_lacks_falls_back() -> None:
    from transformers import Qwen2VLForConditionalGeneration

    flags = supported_attention(Qwen2VLForConditionalGeneration)
    if "flex_attention" in flags:  # pragma: no cover - no stack here has flex for Qwen2-VL
        pytest.skip("this transformers supports flex attention for Qwen2-VL")
    with pytest.warns(omnifix.OmnifixWarning, match="model class does not support it"):
        chosen = choose_attention(
            "flex_attention",
            dtype=torch.float32,
            model_class=Qwen2VLForConditionalGeneration,
            installed={"eager", "sdpa", "flex_attention"},
        )
    assert chosen == "sdpa"


@pytest.mark.parametrize("name", ["eager", "sdpa", " SDPA "])
def test_what_can_run_is_kept(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_attention(name, dtype=torch.float32) == name.strip().lower()


@pytest.mark.parametrize("name", ["kernels-community/flash-attn", "paged|sdpa"])
def test_names_transformers_resolves_itself_pass_through(name: str) -> None:
    assert choose_attention(name, dtype=torch.float32) == name


@pytest.mark.parametrize(("name", "suggestion"), [("flash_attention2", "flash_attention_2")])
def test_unknown_names_are_refused_with_a_suggestion(name: str, suggestion: str) -> None:
    with pytest.raises(omnifix.InvalidArgumentError, match=f"Did you mean '{suggestion}'"):
        choose_attention(name, dtype=torch.float32)
    with pytest.raises(omnifix.InvalidArgumentError, match="not an attention implementation"):
        choose_attention(None, dtype=torch.float32)  # type: ignore[arg-type]
