"""The package as a whole: cheap import, one error tree, the public surface."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

import omnifix
import omnifix.types
from omnifix import errors


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run(  # noqa: S603 - our own interpreter, our own code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(result.stdout.split())


@pytest.mark.parametrize("statement", ["import omnifix", "import omnifix.testing"])
def test_import_is_cheap(statement: str) -> None:
    loaded = _modules_loaded_by(statement)
    assert "omnifix" in loaded  # the probe really imported the package
    heavy = {"torch", "transformers", "accelerate"} & loaded
    assert not heavy, f"{statement} imported {sorted(heavy)}"


def test_using_a_helper_imports_torch_but_not_transformers() -> None:
    loaded = _modules_loaded_by("import omnifix; omnifix.normalize_device('cpu')")
    assert "torch" in loaded
    assert "transformers" not in loaded


def test_every_error_is_an_omnifix_error_and_a_builtin_and_exported() -> None:
    public = [getattr(errors, name) for name in errors.__all__]
    raised = [cls for cls in public if not issubclass(cls, Warning)]
    assert len(raised) == 11
    builtins = (ValueError, RuntimeError, MemoryError, TypeError, ImportError, OSError)
    for cls in raised:
        assert issubclass(cls, omnifix.OmnifixError), cls
        assert cls is omnifix.OmnifixError or issubclass(cls, builtins), cls
        assert getattr(omnifix, cls.__name__) is cls
    assert issubclass(errors.OmnifixDeprecationWarning, omnifix.OmnifixWarning)
    assert issubclass(errors.OmnifixDeprecationWarning, DeprecationWarning)


def test_errors_keep_their_data_through_pickling() -> None:
    plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "8GiB"})
    with pytest.raises(omnifix.InsufficientMemoryError) as refused:
        plan.raise_if_refused()
    assert refused.value.plan is plan
    with pytest.raises(omnifix.DeviceUnavailableError) as missing:
        omnifix.normalize_device("cuda:3")
    assert missing.value.requested == "cuda:3"
    assert missing.value.available[-1] == "cpu"
    with torch.device("meta"):
        skeleton = torch.nn.Linear(2, 2)
    with pytest.raises(omnifix.MetaTensorError) as meta:
        omnifix.assert_no_meta(skeleton)
    assert meta.value.report is not None
    assert [tensor.name for tensor in meta.value.report.uninitialised] == ["weight", "bias"]
    for error in (refused.value, missing.value, meta.value):
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
        assert type(copy) is type(error)
        assert str(copy) == str(error)
    copy = pickle.loads(pickle.dumps(missing.value))  # noqa: S301 - our own bytes
    assert (copy.requested, copy.available) == (missing.value.requested, missing.value.available)


def test_public_surface_is_small_and_old_names_warn_where_they_moved() -> None:
    assert len(omnifix.__all__) <= 28
    assert all(hasattr(omnifix, name) for name in omnifix.__all__)
    assert set(omnifix.types.__all__).isdisjoint(omnifix.__all__)
    for name in ("DeviceBudget", "DeviceUsage", "ResolvedDevice", "EmbeddingPin", "LeanDispatch"):
        with pytest.warns(errors.OmnifixDeprecationWarning, match=f"omnifix.types.{name}"):
            assert getattr(omnifix, name) is getattr(omnifix.types, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        omnifix.nope  # noqa: B018 - the lookup is the test


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("omnifix").joinpath("py.typed").is_file()
