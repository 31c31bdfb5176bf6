"""The documentation site builds in strict mode and documents every public name (needs the `docs` extra).

The build runs ``.ci/docs.sh`` (``mkdocs build --strict``) into a temporary folder; the checks read the HTML
it wrote: an API entry (an element ``id="<import path>"``) for every name in ``emakit.__all__`` and in the
``__all__`` of each public package, the method card's text on its page, and every image a page shows.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The packages whose ``__all__`` the API reference documents.
PUBLIC = [
    "emakit",
    "emakit.functional",
    "emakit.engine.flatten",
    "emakit.algorithms",
    "emakit.averaging",
    "emakit.trainer",
    "emakit.callbacks",
    "emakit.core",
    "emakit.time",
    "emakit.posthoc",
    "emakit.distributed",
    "emakit.checkpoint",
    "emakit.integrations.lightning",
    "emakit.integrations.transformers",
    "emakit.integrations.accelerate",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="needs the docs extra (mkdocs)"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "DOCS_SITE_DIR": str(out)}
    result = subprocess.run(["bash", ".ci/docs.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def _documented(site: Path) -> set[str]:
    ids: set[str] = set()
    for page in (site / "reference").rglob("index.html"):
        ids |= set(re.findall(r'id="(emakit[\w.]*)"', page.read_text()))
    return ids


def _object(path: str) -> object:
    module, _, name = path.rpartition(".")
    while module:
        try:
            return getattr(importlib.import_module(module), name)
        except ModuleNotFoundError:
            module, _, parent = module.rpartition(".")
            name = f"{parent}.{name}"
            continue
        except AttributeError:
            break
    return None


def test_every_public_name_has_an_entry(site: Path) -> None:
    ids = _documented(site)
    documented_objects = {id(_object(path)) for path in ids if path.count(".") >= 1}
    missing = []
    for package in PUBLIC:
        try:
            module = importlib.import_module(package)
        except ImportError:  # a framework that is not installed: its entries are still checked by path
            names = []
            missing += [] if any(i.startswith(package + ".") for i in ids) else [package]
        else:
            names = list(module.__all__)
        for name in names:
            path = f"{package}.{name}"
            if path in ids:
                continue
            # A re-export documented under another import path counts (the page says where).
            if id(getattr(module, name)) not in documented_objects or isinstance(getattr(module, name), (int, str)):
                missing.append(path)
    assert not missing, f"public names without an API entry: {missing}"


def test_method_card_page_is_the_card(site: Path) -> None:
    html = (site / "method-card" / "index.html").read_text()
    card = (ROOT / "src/emakit/algorithms/ema/README.md").read_text()
    for heading in re.findall(r"^## (.+)$", card, flags=re.M):
        assert heading.replace("&", "&amp;") in html, heading
    assert "../../../../docs/" not in html


def test_every_image_a_page_shows_is_in_the_site(site: Path) -> None:
    shown = 0
    for page in site.rglob("*.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+)"', page.read_text()):
            if src.startswith(("http:", "https:", "data:")):
                continue
            shown += 1
            assert (page.parent / src).resolve().is_file(), f"{page.relative_to(site)} shows a missing {src}"
    assert shown >= 3  # the demo's curves (home, getting started) and the post-hoc sweep
