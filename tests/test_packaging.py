"""Versions are pinned in one place: constraints.txt; pyproject.toml and requirements-serve.txt state names/ranges."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, pinned = line.partition("==")
            assert sep, f"constraints.txt: '{line}' is not an exact pin"
            pins[canonicalize_name(name)] = pinned.strip()
    return pins


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [Requirement(line) for line in lines]


def test_every_project_requirement_is_pinned_inside_its_range() -> None:
    pins = _pins()
    for requirement in _project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{requirement.name}=={pins[name]} is outside pyproject's range '{requirement.specifier}'"


def test_the_environment_runs_the_pinned_versions() -> None:
    pins = _pins()
    for requirement in _project_requirements():
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            continue  # an extra this environment did not install
        assert installed == pins[canonicalize_name(requirement.name)], f"{requirement.name} {installed} is installed"


def test_the_serving_image_names_its_packages_and_takes_versions_from_the_constraints() -> None:
    pins = _pins()
    lines = [line for line in (REPO / "requirements-serve.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", line), f"requirements-serve.txt: '{line}' restates a version"
        assert canonicalize_name(line) in pins, f"{line} has no pin in constraints.txt"
    assert "-c constraints.txt" in (REPO / "Dockerfile").read_text()
