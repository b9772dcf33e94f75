"""Packaging: the license, the typing marker, the version, the optional extras."""

import builtins
import importlib.metadata as metadata
import pathlib
import sys
import tomllib

import pytest

import jaxbn
from jaxbn import data

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_comes_from_the_installed_metadata():
    assert jaxbn.__version__ == metadata.version("jaxbn")
    assert jaxbn.__version__ == PYPROJECT["project"]["version"]


def test_license_file_is_the_one_pyproject_names_and_is_shipped():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    meta = metadata.metadata("jaxbn")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File")


def test_typed_marker_is_shipped():
    assert (ROOT / "jaxbn" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["jaxbn"]
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]


def test_classifiers_name_the_python_versions_and_the_license():
    classifiers = PYPROJECT["project"]["classifiers"]
    python = [c for c in classifiers if c.startswith("Programming Language :: Python :: 3.")]
    assert f"Programming Language :: Python :: 3.{sys.version_info.minor}" in python


def test_floors_are_at_most_the_installed_versions():
    # The floors claim what the suite runs against: the installed versions satisfy them.
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, floor = requirement.split(">=")
        installed = tuple(int(p) for p in metadata.version(name).split(".")[:3])
        assert installed >= tuple(int(p) for p in floor.split(".")), (name, floor)


def test_load_digits_without_scikit_learn_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"jaxbn\[examples\]"):
        data.load_digits()
