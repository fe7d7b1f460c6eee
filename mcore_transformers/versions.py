"""The releases of transformers, peft and megatron-core this package is tested with, and one warning outside them.

The ranges are the package's own requirements (pyproject.toml, read back from the installed metadata), so
they are written once. CI tests transformers at both ends of its range (README "Tested versions"); these
three are the libraries whose behaviour the package depends on beyond their documented APIs. A release
outside the range is allowed (people try new releases) but named once, at import.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from typing import Mapping, Optional

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

DISTRIBUTION = "mcore-transformers"
CHECKED = ("transformers", "peft", "megatron-core")


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the range this release of mcore_transformers is tested with."""


def tested_ranges() -> dict[str, str]:
    """{package: specifier} for the checked packages, from the installed package's requirements ({} if not installed)."""
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for text in requirements:
        requirement = Requirement(text)
        name = _canonical(requirement.name)
        if name in CHECKED and requirement.marker is None:
            # lower bound first: ">=5.19.0,<5.25"
            ranges[name] = ",".join(sorted((str(spec) for spec in requirement.specifier), key=lambda s: s[0] != ">"))
    return ranges


def untested(installed: Mapping[str, Optional[str]], ranges: Mapping[str, str]) -> list[str]:
    """'name version (tested: range)' for every installed package outside its tested range."""
    outside = []
    for name, specifier in sorted(ranges.items()):
        version = installed.get(name)
        if version is None:
            continue
        try:
            inside = Requirement(f"{name}{specifier}").specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            outside.append(f"{name} {version} (tested: {specifier})")
    return outside


def installed_versions(names=CHECKED) -> dict[str, Optional[str]]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def warn_if_untested() -> None:
    """One UntestedVersionWarning naming every installed release outside the tested ranges (nothing otherwise)."""
    outside = untested(installed_versions(), tested_ranges())
    if outside:
        warnings.warn(
            f"mcore_transformers is tested with other releases than the installed {', '.join(outside)}. It may "
            "work; if it does not, install a release of the tested range (pip install -e . or the versions in "
            "requirements/lock.txt).",
            UntestedVersionWarning,
            stacklevel=3,
        )


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
