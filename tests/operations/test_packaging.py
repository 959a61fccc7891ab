"""Packaging metadata: the license in the SPDX form setuptools asks for (PEP 639), with the setuptools that
reads it; installing must not print setuptools' ``project.license`` deprecation."""

from __future__ import annotations

import warnings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.version import Version
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution
from support.paths import ROOT

PYPROJECT = ROOT / "pyproject.toml"
SPDX_SETUPTOOLS = Version("77")  # the first setuptools that reads `license = "<SPDX>"` and license-files


def test_license_is_an_spdx_expression_with_its_file():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["license"] == "Apache-2.0"
    for pattern in project["license-files"]:
        files = sorted(ROOT.glob(pattern))
        assert files, f"license-files {pattern!r} matches no file"
        assert all("Apache License" in f.read_text()[:200] for f in files), files


def test_the_build_requires_a_setuptools_that_reads_it():
    requires = [Requirement(r) for r in tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]]
    (setuptools,) = [r for r in requires if r.name == "setuptools"]
    assert not setuptools.specifier.contains(Version("76.2"), prereleases=True), setuptools
    assert setuptools.specifier.contains(SPDX_SETUPTOOLS)


def test_setuptools_reads_the_metadata_without_a_deprecation():
    distribution = Distribution()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(distribution, PYPROJECT)
    about_license = [str(w.message) for w in caught if "license" in str(w.message).lower()]
    assert not about_license, about_license
    assert distribution.metadata.license_expression == "Apache-2.0"
