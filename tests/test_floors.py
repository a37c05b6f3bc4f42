"""The floors: pyproject.toml's ``>=`` versions are the oldest releases supported, pinned in .ci/floors.txt,
where ``make test-oldest`` runs the suite; and .ci/no_upgrade_check.py, which it runs there, names every
installed package that installing vram_magic would change."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def floors_in_pyproject() -> dict[str, Version]:
    """Each dependency's ``>=`` floor, by canonical name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        (spec,) = [spec for spec in requirement.specifier if spec.operator == ">="]
        floors[canonicalize_name(requirement.name)] = Version(spec.version)
    return floors


def pins_in_floors_file() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_has_a_floor_and_the_floors_file_pins_each_one() -> None:
    floors, pins = floors_in_pyproject(), pins_in_floors_file()
    assert set(floors) == set(pins)
    for name, floor in floors.items():
        pin = pins[name]
        # the pin is the floor itself, or a release of its series (torch>=2.5 is tested as 2.5.1)
        assert pin >= floor and pin.release[: len(floor.release)] == floor.release, (
            name,
            str(floor),
            str(pin),
        )


def test_python_and_torch_floors() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert floors_in_pyproject()["torch"] == Version("2.5")


def _no_upgrade_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("no_upgrade_check", ROOT / ".ci" / "no_upgrade_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(*installs: tuple[str, str]) -> dict[str, Any]:
    """pip's --report, cut to what the check reads."""
    return {"install": [{"metadata": {"name": name, "version": version}} for name, version in installs]}


def test_the_no_upgrade_check_names_each_upgrade_and_downgrade_of_an_installed_package() -> None:
    check = _no_upgrade_check()
    installed = {"torch": "2.5.1", "transformers": "4.45.0", "psutil": "5.9.0", "ipython": "8.12.0"}
    report = _report(
        ("vram_magic", "0.1.0"),  # the project itself
        ("torch", "2.13.0"),  # an upgrade
        ("IPython", "8.11.0"),  # a downgrade, named as the index spells it
        ("transformers", "4.45.0"),  # the same version: no change
        ("datasets", "2.14.0"),  # not installed yet: a new package is no change
    )
    assert check.changes(report, installed) == [
        "IPython: 8.12.0 installed, pip would install 8.11.0",
        "torch: 2.5.1 installed, pip would install 2.13.0",
    ]
    assert check.changes(_report(("vram_magic", "0.1.0")), installed) == []
    assert check.canonical("Nvidia_ML.py") == "nvidia-ml-py"
