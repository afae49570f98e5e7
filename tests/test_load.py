"""load_safely and placement_report on real tiny checkpoints, loaded by the real from_pretrained.

Everything runs on the cpu: refusal by budget, offload to disk, missing flash-attn, corrupt and
missing checkpoints, the dtype keyword per transformers version, kwargs forwarding, and the
report. GPU behaviour (bf16, flash, splits, CUDA memory) is in tests/gpu/test_load_gpu.py.
"""

from __future__ import annotations

import gc
import io
import logging
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import omnifix
import omnifix.testing as ot
from omnifix import CheckpointError, load_safely, placement_report
from omnifix._compat import dtype_keyword
from omnifix.errors import AttentionUnavailableError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from omnifix.testing import Family

Model = Any  # transformers models are untyped at the attributes tests read


def _tf_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ot.available_families())
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    family: Family = request.param
    return family, ot.save_tiny_model(family, tmp_path_factory.mktemp(family.replace(".", "_")))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ot.save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"))


def _weights_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


def _plain(path: Path, family: Family = "qwen2", **kwargs: Any) -> Model:
    return ot.model_class(family).from_pretrained(path, **kwargs).eval()


class Created:
    """Every transformers model built while a test runs: names kept, models held weakly."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.models: weakref.WeakSet[Any] = weakref.WeakSet()

    def survivors(self) -> list[str]:
        """Models still alive with real weights (the planner caches skeletons on meta: those
        hold no memory and do not count)."""
        gc.collect()
        return [
            type(model).__name__
            for model in self.models
            if any(not parameter.is_meta for parameter in model.parameters())
        ]


@pytest.fixture
def created_models(monkeypatch: pytest.MonkeyPatch) -> Created:
    from transformers import PreTrainedModel

    created = Created()
    real = PreTrainedModel.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        created.names.append(type(self).__name__)
        created.models.add(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "__init__", init)
    return created


def _offload_cap(path: Path) -> int:
    """A cpu budget that the planner answers with an offload to disk (too small for the whole
    model, enough for part of it), found by asking the planner."""
    from omnifix import plan_placement

    alone = plan_placement(path, budgets={"cpu": 2**40})
    row = alone.device("cpu")
    need = row.total + row.margin
    for quarter in (1, 2, 3):
        cap = need - row.weights * quarter // 4
        plan = plan_placement(path, budgets={"cpu": cap}, allow_offload=True)
        if plan.strategy == "offload" and "disk" in plan.device_map.values():
            return cap
    pytest.fail(f"the planner offloads nothing to disk for any cpu budget below {need}:\n{alone}")


@pytest.fixture
def spy_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every call of Qwen2ForCausalLM.from_pretrained (the real one still runs)."""
    cls = ot.model_class("qwen2")
    real = cls.from_pretrained.__func__  # type: ignore[attr-defined]
    calls: list[dict[str, Any]] = []

    def spy(klass: type[Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


@pytest.fixture
def transformers_log() -> Iterator[io.StringIO]:
    """What transformers logs (it does not propagate to the root logger, so caplog misses it)."""
    import transformers

    transformers.utils.logging.warning_once.cache_clear()  # else a message shows only once
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def _outputs(model: Model, family: Family) -> torch.Tensor:
    config = model.config.thinker_config if family == "qwen2.5-omni" else model.config
    inputs = ot.tiny_inputs(family, config)
    runner = model.thinker if family == "qwen2.5-omni" else model
    with torch.no_grad():
        logits: torch.Tensor = runner(**inputs).logits
    return logits


# --- loading every family on the cpu ---------------------------------------------------------


def test_every_family_loads_like_from_pretrained(family_dir: tuple[Family, Path]) -> None:
    family, path = family_dir
    model = load_safely(path, device="cpu")
    plain = _plain(path, family)
    assert type(model) is ot.model_class(family)
    assert not model.training
    assert model.dtype == torch.float32  # fp32 on the cpu unless asked
    assert model.config._attn_implementation == "sdpa"
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert torch.equal(_outputs(model, family), _outputs(plain, family))
    report = placement_report(model)
    assert report.planned
    assert report.strategy == "single"
    assert [usage.device for usage in report.devices] == ["cpu"]
    unique = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    assert report.devices[0].weights == sum(t.numel() * t.element_size() for t in unique)
    assert report.input_device == torch.device("cpu")
    assert report.offloaded == {}


def test_plain_text_model_through_an_auto_class(tiny_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    model = load_safely(tiny_lm_dir, model_class=AutoModelForCausalLM, device="cpu")
    assert type(model) is Qwen2ForCausalLM  # the concrete class the Auto class maps to
    ids = torch.tensor([[1, 2, 3, 4]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_default_device_is_the_cpu_without_gpus(qwen2_dir: Path) -> None:
    model = load_safely(qwen2_dir)
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_unknown_architecture_needs_model_class(qwen2_dir: Path, tmp_path: Path) -> None:
    import json

    copy = Path(shutil.copytree(qwen2_dir, tmp_path / "renamed"))
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["Qwen2ForSomethingElse"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(omnifix.UnsupportedModelError, match="Qwen2ForSomethingElse") as raised:
        load_safely(copy, device="cpu")
    assert "Pass model_class=" in str(raised.value)
    model = load_safely(copy, device="cpu", model_class=ot.model_class("qwen2"))
    assert type(model).__name__ == "Qwen2ForCausalLM"


# --- refusing --------------------------------------------------------------------------------


def test_refusal_states_numbers_and_loads_nothing(
    qwen2_dir: Path, spy_from_pretrained: list[dict[str, Any]], created_models: Created
) -> None:
    from omnifix import plan_placement

    with pytest.raises(omnifix.InsufficientMemoryError) as raised:
        load_safely(qwen2_dir, max_memory={"cpu": "1KiB"})
    assert isinstance(raised.value, MemoryError)
    # The message is the plan's own explanation for exactly these budgets: need vs free.
    cls = ot.model_class("qwen2")
    plan = plan_placement(
        cls.config_class.from_pretrained(qwen2_dir),
        model_class=cls,
        budgets={"cpu": 1024},
        dtype=torch.float32,
        attn_implementation="sdpa",
    )
    assert not plan.fits
    assert str(raised.value).startswith(plan.explain())
    assert str(raised.value).endswith("drop max_memory= to plan with the free memory.")
    refused = raised.value.plan  # the plan load_safely refused, for callers to inspect
    assert refused is not None
    assert not refused.fits
    assert refused.explain() == plan.explain()
    assert "cpu: needs" in str(raised.value)
    assert "short" in str(raised.value)
    assert spy_from_pretrained == []  # refused before from_pretrained
    # Only the planner's meta skeletons (the plan's, and its options' in another dtype).
    assert created_models.survivors() == []


def test_allow_offload_loads_an_explicit_offload_map(qwen2_dir: Path) -> None:
    offload_dirs = set(Path(tempfile.gettempdir()).glob("omnifix-offload-*"))
    model = load_safely(qwen2_dir, max_memory={"cpu": _offload_cap(qwen2_dir)}, allow_offload=True)
    meta = omnifix.find_meta_tensors(model)
    assert meta.offloaded
    assert not meta.uninitialised
    assert {tensor.offloaded_to for tensor in meta.offloaded} == {"disk"}
    assert "disk" in model.hf_device_map.values()
    assert torch.equal(_outputs(model, "qwen2"), _outputs(_plain(qwen2_dir), "qwen2"))
    report = placement_report(model)
    assert report.strategy == "offload"
    assert report.offloaded == {"disk": meta.total_bytes}
    disk, cpu = report.usage("disk"), report.usage("cpu")
    assert disk is not None
    assert cpu is not None
    assert (disk.weights, disk.budget) == (meta.total_bytes, None)  # the disk has no budget
    assert cpu.offloaded == 0  # the cpu computes here: its weights are resident
    assert cpu.predicted_peak is not None
    assert cpu.budget is not None
    assert cpu.predicted_peak <= cpu.budget
    assert report.total_weights == placement_report(_plain(qwen2_dir)).total_weights
    # The offload folder load_safely made (transformers 5 reads safetensors offloads in place
    # and may leave it empty) goes away with the model.
    created = set(Path(tempfile.gettempdir()).glob("omnifix-offload-*")) - offload_dirs
    assert len(created) == 1
    assert created.pop().is_dir()
    del model, meta
    gc.collect()
    assert set(Path(tempfile.gettempdir()).glob("omnifix-offload-*")) == offload_dirs


def test_missing_weights_in_an_offloaded_module_are_refused_and_freed(
    qwen2_dir: Path, tmp_path: Path, created_models: Created
) -> None:
    """Keys missing from a disk-offloaded module stay on meta with no data: assert_no_meta
    refuses them even with allow_offload=True, and the half-checked model is released."""
    from safetensors.torch import load_file, save_file

    broken = Path(shutil.copytree(qwen2_dir, tmp_path / "missing"))
    weights = load_file(broken / "model.safetensors")
    dropped = "model.layers.3.mlp.up_proj.weight"
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    cap = _offload_cap(broken)
    with pytest.raises(omnifix.MetaTensorError) as raised:
        load_safely(broken, max_memory={"cpu": cap}, allow_offload=True)
    assert dropped in str(raised.value)
    assert "uninitialised" in str(raised.value)
    assert "Qwen2ForCausalLM" in created_models.names  # built (and checked) ...
    assert created_models.survivors() == []  # ... and released


# --- attention -------------------------------------------------------------------------------


def test_missing_flash_attn_falls_back_to_sdpa(family_dir: tuple[Family, Path]) -> None:
    _, path = family_dir
    with pytest.warns(omnifix.OmnifixWarning, match="flash_attention_2") as caught:
        model = load_safely(path, device="cpu", attn_implementation="flash_attention_2")
    assert caught[0].filename == __file__  # blames this call, not omnifix internals
    assert model.config._attn_implementation == "sdpa"
    assert placement_report(model).attention == {}  # every sub-model runs sdpa too


def test_strict_refuses_before_loading(
    qwen2_dir: Path, spy_from_pretrained: list[dict[str, Any]]
) -> None:
    with pytest.raises(AttentionUnavailableError) as raised:
        load_safely(qwen2_dir, device="cpu", attn_implementation="flash_attention_2", strict=True)
    assert isinstance(raised.value, ImportError)
    assert spy_from_pretrained == []


def test_eager_when_asked(qwen2_dir: Path) -> None:
    model = load_safely(qwen2_dir, device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert placement_report(model).attn_implementation == "eager"


def test_attention_per_sub_config(tmp_path: Path) -> None:
    path = ot.save_tiny_model("qwen2-vl", tmp_path / "vl")
    request = {"": "sdpa", "vision_config": "eager"}
    if _tf_version() < (4, 57):
        with pytest.raises(omnifix.UnsupportedModelError, match="per-sub-config"):
            load_safely(path, device="cpu", attn_implementation=request)
        return
    model = load_safely(path, device="cpu", attn_implementation=request)
    report = placement_report(model)
    assert report.attn_implementation == "sdpa"
    assert report.attention == {"model.visual": "eager"}
    with pytest.raises(omnifix.InvalidArgumentError, match="'vision_config'"):
        load_safely(path, device="cpu", attn_implementation={"vision": "eager"})


def test_omni_token2wav_keeps_its_own_float32_and_sdpa(tmp_path: Path) -> None:
    if "qwen2.5-omni" not in ot.available_families():
        pytest.skip("this transformers has no Qwen2.5-Omni")
    path = ot.save_tiny_model("qwen2.5-omni", tmp_path / "omni")
    with pytest.warns(omnifix.OmnifixWarning, match="token2wav") as caught:
        model = load_safely(path, device="cpu", dtype="bfloat16", attn_implementation="eager")
    # transformers swaps eager for sdpa inside token2wav without a word; omnifix names each one.
    [warning] = [w for w in caught if "transformers runs" in str(w.message)]
    assert warning.filename == __file__
    assert "token2wav.code2wav_dit_model with 'sdpa'" in str(warning.message)
    assert str(warning.message).endswith("pass attn_implementation='auto'.")
    assert {p.dtype for p in model.token2wav.parameters()} == {torch.float32}
    assert {p.dtype for p in model.thinker.parameters()} == {torch.bfloat16}
    report = placement_report(model)
    assert report.dtype == torch.bfloat16
    assert report.dtypes["float32"] > 0
    assert report.dtypes["bfloat16"] > 0
    # The model swaps eager for sdpa inside token2wav itself; the report shows it.
    assert report.attn_implementation == "eager"
    assert report.attention
    assert set(report.attention.values()) == {"sdpa"}
    assert all(name.startswith("token2wav") for name in report.attention)
    # "auto" lets each sub-model run what it supports: nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", omnifix.OmnifixWarning)
        auto = load_safely(path, device="cpu", dtype="bfloat16")
    assert placement_report(auto).attn_implementation == "sdpa"


# --- dtype -----------------------------------------------------------------------------------


def test_dtype_goes_under_the_keyword_this_transformers_takes(
    qwen2_dir: Path, transformers_log: io.StringIO, spy_from_pretrained: list[dict[str, Any]]
) -> None:
    model = load_safely(qwen2_dir, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert spy_from_pretrained[0][dtype_keyword()] is torch.bfloat16
    assert "torch_dtype" not in spy_from_pretrained[0] or dtype_keyword() == "torch_dtype"
    assert "deprecated" not in transformers_log.getvalue()
    # Controls: the other keyword really is wrong on this version.
    if _tf_version() < (4, 56):
        with pytest.raises(TypeError, match="dtype"):
            _plain(qwen2_dir, dtype=torch.bfloat16)  # 4.45: dtype= reaches the model's __init__
    elif _tf_version() < (5, 0):
        _plain(qwen2_dir, torch_dtype=torch.bfloat16)
        assert "`torch_dtype` is deprecated" in transformers_log.getvalue()


def test_torch_dtype_is_an_alias(
    qwen2_dir: Path, transformers_log: io.StringIO, spy_from_pretrained: list[dict[str, Any]]
) -> None:
    model = load_safely(qwen2_dir, device="cpu", torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    assert set(spy_from_pretrained[0]) & {"dtype", "torch_dtype"} == {dtype_keyword()}
    assert "deprecated" not in transformers_log.getvalue()
    with pytest.raises(omnifix.InvalidArgumentError, match="Pass one"):
        load_safely(qwen2_dir, dtype="bf16", torch_dtype=torch.float16)


# --- broken checkpoints ----------------------------------------------------------------------


def test_truncated_shard_is_a_checkpoint_error_and_frees_the_model(
    tmp_path: Path, created_models: Created
) -> None:
    model = ot.tiny_model("qwen2")
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="100KB")
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 1
    last = shards[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    del model
    assert created_models.survivors() == []
    with pytest.raises(CheckpointError) as raised:
        load_safely(path, device="cpu")
    error = raised.value
    assert isinstance(error, OSError)
    assert isinstance(error, omnifix.OmnifixError)
    assert last.name in str(error)
    assert all(shard.name not in str(error) for shard in shards[:-1])
    assert str(error).endswith("then retry.")
    assert error.__cause__ is not None
    # The model was built and partly loaded; the failed call's frames (kept by the chained
    # traceback) no longer hold it.
    assert created_models.names.count("Qwen2ForCausalLM") >= 2  # tiny_model(), then the load
    assert created_models.survivors() == []


def test_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError) as raised:
        load_safely(missing, device="cpu")
    assert str(missing) in str(raised.value)
    assert isinstance(raised.value, OSError)
    assert "config.json" in str(raised.value)


def test_directory_without_weights_is_a_checkpoint_error(qwen2_dir: Path, tmp_path: Path) -> None:
    empty = Path(shutil.copytree(qwen2_dir, tmp_path / "noweights"))
    for weights in empty.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_safely(empty, device="cpu")


# --- forwarding and explicit maps ------------------------------------------------------------


def test_other_kwargs_reach_from_pretrained_untouched(qwen2_dir: Path, tmp_path: Path) -> None:
    nested = tmp_path / "repo"
    shutil.copytree(qwen2_dir, nested / "weights")
    offload = tmp_path / "offload"
    model = load_safely(
        nested,
        subfolder="weights",  # needed by the config read and by from_pretrained
        use_cache=False,  # a config override, applied by transformers
        offload_folder=str(offload),
        max_memory={"cpu": _offload_cap(qwen2_dir)},
        allow_offload=True,
    )
    assert model.config.use_cache is False
    assert "disk" in model.hf_device_map.values()
    del model
    gc.collect()
    assert offload.is_dir()  # the caller's folder is left in place


def test_explicit_device_map_is_honoured_and_checked(
    qwen2_dir: Path, spy_from_pretrained: list[dict[str, Any]]
) -> None:
    model = load_safely(qwen2_dir, device_map={"": "cpu"})
    assert spy_from_pretrained[-1]["device_map"] == {"": "cpu"}
    assert placement_report(model).strategy == "explicit"
    calls = len(spy_from_pretrained)
    offloading = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(omnifix.InvalidArgumentError, match="allow_offload=True"):
        load_safely(qwen2_dir, device_map=offloading)
    with pytest.raises(omnifix.InvalidArgumentError, match="device="):
        load_safely(qwen2_dir, device_map="auto")
    with pytest.raises(omnifix.InvalidArgumentError, match="nothing to choose"):
        load_safely(qwen2_dir, device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})
    with pytest.raises(omnifix.DeviceError, match="meta"):
        load_safely(qwen2_dir, device_map={"": "meta"})
    assert len(spy_from_pretrained) == calls  # every refusal came before loading


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_loading_info": True}, omnifix.InvalidArgumentError, "returns the model"),
        ({"dtype": "int8"}, omnifix.InvalidArgumentError, "not a dtype"),
        ({"attn_implementation": "flash_attn_2"}, omnifix.InvalidArgumentError, "Did you mean"),
        ({"max_memory": {"cpu": "lots"}}, omnifix.InvalidArgumentError, "not a memory size"),
        ({"max_memory": {0: "1GiB"}}, omnifix.DeviceUnavailableError, "not available"),
        ({"device": "cuda"}, omnifix.DeviceUnavailableError, "cuda"),
        ({"device": "meta"}, omnifix.DeviceError, "meta"),
        ({"workload": {"text_tokens": 8}}, omnifix.InvalidArgumentError, "Workload"),
    ],
)
def test_bad_arguments_are_refused_before_loading(
    qwen2_dir: Path,
    spy_from_pretrained: list[dict[str, Any]],
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        load_safely(qwen2_dir, **kwargs)
    assert spy_from_pretrained == []


# --- the report ------------------------------------------------------------------------------


def test_report_of_a_model_omnifix_did_not_load(qwen2_dir: Path, tmp_path: Path) -> None:
    plain = placement_report(_plain(qwen2_dir))
    assert (plain.planned, plain.strategy) == (False, "single")
    assert plain.devices[0].predicted_peak is None
    assert plain.dtype == torch.float32
    offloaded_model = _plain(
        qwen2_dir,
        device_map="auto",
        max_memory={"cpu": _weights_size(qwen2_dir) // 3},
        offload_folder=str(tmp_path / "offload"),
    )
    report = placement_report(offloaded_model)
    assert report.strategy == "offload"
    assert report.offloaded["disk"] == omnifix.find_meta_tensors(offloaded_model).total_bytes
    assert report.total_weights == plain.total_weights
    with pytest.raises(omnifix.UnsupportedModelError, match=r"torch\.nn\.Module"):
        placement_report("model")  # type: ignore[arg-type]


def test_report_is_kept_beside_the_model_not_in_it(qwen2_dir: Path) -> None:
    model = load_safely(qwen2_dir, device="cpu")
    assert model.state_dict().keys() == _plain(qwen2_dir).state_dict().keys()
    assert not [name for name in vars(model) if "omnifix" in name]
    report = placement_report(model)
    text = str(report)
    assert text.splitlines()[0].startswith("Qwen2ForCausalLM: single")
    assert "cpu" in text
    assert "predicted peak" in text
    usage = report.usage("cpu")
    assert usage is not None
    assert usage.predicted_peak is not None
    assert usage.budget is not None
    assert usage.predicted_peak <= usage.budget
    assert report.usage(torch.device("cpu")) == usage
    assert report.usage(0) is None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the record does not keep the model alive


def test_loading_emits_no_omnifix_warning_when_nothing_falls_back(qwen2_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", omnifix.OmnifixWarning)
        load_safely(qwen2_dir, device="cpu", attn_implementation="sdpa", dtype="fp32")


def test_a_model_planned_on_a_bound_loads_once_the_bound_is_accepted(
    tmp_path: Path, linear_attention_config: Any
) -> None:
    # The refusal's option names accept_bound=True; pasted into load_safely it must load.
    import transformers

    path = tmp_path / "qwen3-next"
    transformers.AutoModelForCausalLM.from_config(linear_attention_config).save_pretrained(path)
    with pytest.raises(omnifix.InsufficientMemoryError) as refused:
        load_safely(path, device="cpu")
    (bound,) = [o for o in refused.value.plan.options if o.kind == "bound"]
    assert bound.load == "accept_bound=True"
    model = eval(f"load_safely(path, device='cpu', {bound.load})")  # noqa: S307 - as printed
    omnifix.assert_no_meta(model)
    assert model.device.type == "cpu"
