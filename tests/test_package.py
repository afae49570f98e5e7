"""The package as a whole: cheap import, one error tree, the public surface."""

from __future__ import annotations

import subprocess
import sys

import pytest

import omnifix
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


def test_every_public_error_is_an_omnifix_error() -> None:
    public = [getattr(errors, name) for name in errors.__all__]
    exceptions = [cls for cls in public if issubclass(cls, BaseException)]
    assert len(exceptions) >= 6
    for cls in exceptions:
        assert issubclass(cls, omnifix.OmnifixError) or issubclass(cls, Warning), cls
        assert getattr(omnifix, cls.__name__) is cls  # re-exported at the top level


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (omnifix.InvalidArgumentError, ValueError),
        (omnifix.DeviceError, omnifix.InvalidArgumentError),
        (omnifix.DeviceError, ValueError),
        (omnifix.DeviceUnavailableError, ValueError),
        (omnifix.MetaTensorError, RuntimeError),
        (omnifix.InsufficientMemoryError, MemoryError),
        (omnifix.UnsupportedModelError, TypeError),
        (omnifix.AttentionUnavailableError, ImportError),
        (omnifix.AttentionUnavailableError, omnifix.UnsupportedModelError),
        (omnifix.CheckpointError, OSError),
    ],
)
def test_errors_are_caught_by_the_builtin_handlers_callers_already_have(
    error: type[Exception], builtin: type[Exception]
) -> None:
    with pytest.raises(builtin):
        raise error("message")


def test_unavailable_device_is_a_device_error() -> None:
    assert issubclass(omnifix.DeviceUnavailableError, omnifix.DeviceError)


def test_all_names_resolve() -> None:
    for name in omnifix.__all__:
        assert hasattr(omnifix, name), name


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("omnifix").joinpath("py.typed").is_file()
