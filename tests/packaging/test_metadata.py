"""The package's metadata agrees with itself: one version, PEP 639 licence fields, a real LICENSE, a changelog entry.

These read the repository's files; building and installing the wheel is ``.ci/wheel_smoke.sh``'s job.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

import emakit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "emakit"


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def literal_version(path: Path) -> str | None:
    """The string assigned to ``__version__`` at module level of ``path``, if it is a literal."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__version__" for t in targets):
                value = node.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    return value.value
    return None


def test_version_has_one_source(pyproject: dict[str, Any]) -> None:
    project = pyproject["project"]
    assert "version" not in project, "the version is written in _version.py, not in pyproject.toml"
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "emakit._version.__version__"}

    written = literal_version(PACKAGE / "_version.py")
    assert written is not None, "_version.py must assign __version__ a string literal (setuptools reads it statically)"
    Version(written)  # a valid PEP 440 version, or InvalidVersion
    assert emakit.__version__ == written
    # __init__.py re-exports it rather than writing a second copy that could drift.
    assert literal_version(PACKAGE / "__init__.py") is None


READ_VERSION = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    class Refuse(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("emakit", "torch"):
                raise ImportError(f"the build imported {name}")
            return None

    sys.meta_path.insert(0, Refuse())
    from setuptools.config.expand import read_attr

    print(read_attr("emakit._version.__version__", {"": "src"}, "."))
    """
)


def read_version_as_setuptools_does(root: Path) -> subprocess.CompletedProcess[str]:
    """What ``[tool.setuptools.dynamic] version = {attr = ...}`` yields under ``root``, with emakit and torch
    made unimportable (a build environment has neither)."""
    pytest.importorskip("setuptools")
    return subprocess.run(
        [sys.executable, "-c", READ_VERSION], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )


def test_setuptools_reads_the_version_without_importing_the_package() -> None:
    done = read_version_as_setuptools_does(ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == literal_version(PACKAGE / "_version.py")


def test_a_computed_version_would_import_at_build_time(tmp_path: Path) -> None:
    """The check above can fail: a version that is not a literal makes setuptools run _version.py."""
    (tmp_path / "src" / "emakit").mkdir(parents=True)
    (tmp_path / "src" / "emakit" / "__init__.py").write_text("import torch\n")
    (tmp_path / "src" / "emakit" / "_version.py").write_text("import torch\n\n__version__ = str(torch.__version__)\n")
    done = read_version_as_setuptools_does(tmp_path)
    assert done.returncode != 0
    assert "the build imported torch" in done.stderr


def test_license_fields_are_pep_639(pyproject: dict[str, Any]) -> None:
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated {text = ...} table
    assert project["license-files"] == ["LICENSE"]
    # PEP 639: licence classifiers must not be given alongside a licence expression.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    # setuptools writes License-Expression and License-File from 77 on; an older one would fail the build.
    (setuptools,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert Version("77.0") in setuptools.specifier
    assert Version("76.9") not in setuptools.specifier


def test_license_file_is_the_full_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "http://www.apache.org/licenses/" in text
    # All nine sections, in order, then the end of the terms: a complete copy, not a stub or a notice.
    sections = [
        "Definitions",
        "Grant of Copyright License",
        "Grant of Patent License",
        "Redistribution",
        "Submission of Contributions",
        "Trademarks",
        "Disclaimer of Warranty",
        "Limitation of Liability",
        "Accepting Warranty or Additional Liability",
    ]
    positions = [text.find(f"{i}. {title}.") for i, title in enumerate(sections, start=1)]
    assert -1 not in positions, dict(zip(sections, positions, strict=True))
    assert positions == sorted(positions)
    assert text.find("END OF TERMS AND CONDITIONS") > positions[-1]


def test_changelog_has_the_current_version(pyproject: dict[str, Any]) -> None:
    version = literal_version(PACKAGE / "_version.py")
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings[:2] == ["Unreleased", version], headings
    # The current version's section has entries, and its heading resolves to a link.
    section = text.split(f"## [{version}]", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^### Added$", section, flags=re.MULTILINE)
    assert re.search(r"^- ", section, flags=re.MULTILINE)
    assert re.search(rf"^\[{re.escape(version)}\]: https://", text, flags=re.MULTILINE)


def test_python_classifiers_match_requires_python(pyproject: dict[str, Any]) -> None:
    project = pyproject["project"]
    supported = SpecifierSet(project["requires-python"])
    listed = [
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert listed == ["3.10", "3.11", "3.12", "3.13"]
    assert all(Version(v) in supported for v in listed)
    assert Version("3.9") not in supported  # the oldest classifier is the floor requires-python sets
    assert "Typing :: Typed" in project["classifiers"]
    assert (PACKAGE / "py.typed").is_file()


def test_project_urls_point_at_files_that_exist(pyproject: dict[str, Any]) -> None:
    urls = pyproject["project"]["urls"]
    assert {"Documentation", "Changelog", "Source"} <= urls.keys()
    in_repo = {name: url.split("/blob/main/", 1)[1] for name, url in urls.items() if "/blob/main/" in url}
    assert in_repo["Documentation"] == "README.md"
    assert "src/emakit/algorithms/ema/README.md" in in_repo.values()
    missing = {name: path for name, path in in_repo.items() if not (ROOT / path.split("#")[0]).is_file()}
    assert not missing


def test_extras(pyproject: dict[str, Any]) -> None:
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    names = {name: {Requirement(r).name for r in reqs} for name, reqs in extras.items()}
    assert {"demo", "bench", "test", "lightning", "transformers", "accelerate", "all"} <= names.keys()
    assert "lightning" in names["lightning"]
    assert {"transformers", "accelerate", "safetensors"} <= names["transformers"]
    assert {"accelerate", "safetensors"} <= names["accelerate"]
    assert {"build", "twine"} <= names["test"]
    (everything,) = [Requirement(r) for r in extras["all"]]
    assert everything.name == "emakit"
    assert {"demo", "lightning", "transformers"} <= everything.extras
    # Every extra the package asks of itself exists.
    for reqs in extras.values():
        for req in map(Requirement, reqs):
            if req.name == "emakit":
                assert req.extras <= extras.keys(), req


def test_package_data_covers_every_markdown_file_and_py_typed(pyproject: dict[str, Any]) -> None:
    patterns = pyproject["tool"]["setuptools"]["package-data"]["emakit"]
    covered = {p.relative_to(PACKAGE) for pattern in patterns for p in PACKAGE.glob(pattern) if p.is_file()}
    wanted = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.md")} | {Path("py.typed")}
    assert Path("algorithms/ema/README.md") in wanted
    assert wanted <= covered, sorted(map(str, wanted - covered))
