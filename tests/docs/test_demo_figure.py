"""docs/demo_curves.png and the numbers the pages quote come from one run of ``python -m emakit.demo.figure``.

The script writes the figure and ``docs/demo_curves.json`` together, and stores the JSON in the PNG's
``Description`` text chunk: the test reads that chunk back (the figure and the numbers are from one run),
checks the JSON's settings are the demo's defaults (a plain ``emakit demo`` reproduces them), and that every
page showing the figure quotes the JSON's numbers and no others beside it.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from emakit.demo.config import DemoConfig
from emakit.demo.figure import FIGURE_NAME, NUMBERS_NAME

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", DOCS / "getting-started.md", DOCS / "index.md"]


def png_text(path: Path) -> dict[str, str]:
    """The tEXt, zTXt and iTXt chunks of a PNG file, by keyword."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    found, offset = {}, 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"tEXt":
            key, value = body.split(b"\0", 1)
            found[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, value = body.split(b"\0", 1)
            found[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed, rest = rest[0], rest[2:]
            _, rest = rest.split(b"\0", 1)  # language tag
            _, text = rest.split(b"\0", 1)  # translated keyword
            found[key.decode("utf-8")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
    return found


@pytest.fixture(scope="module")
def numbers() -> dict[str, Any]:
    return json.loads((DOCS / NUMBERS_NAME).read_text())  # type: ignore[no-any-return]


def test_the_figure_and_its_numbers_come_from_one_run(numbers: dict[str, Any]) -> None:
    assert png_text(DOCS / FIGURE_NAME)["Description"] == (DOCS / NUMBERS_NAME).read_text()


def test_the_numbers_are_those_of_the_demo_defaults(numbers: dict[str, Any]) -> None:
    defaults = {k: v for k, v in asdict(DemoConfig(out=Path("."))).items() if k not in ("out", "plot", "progress")}
    assert numbers["config"] == defaults


def _quoted(numbers: dict[str, Any]) -> set[str]:
    return {
        f"{numbers[kind][key]:.1f}%" for kind in ("raw", "ema") for key in ("final_accuracy_pct", "best_accuracy_pct")
    } | {f"{numbers[kind]['noise_pp']:.2f}" for kind in ("raw", "ema")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_showing_the_figure_quote_its_numbers(page: Path, numbers: dict[str, Any]) -> None:
    text = page.read_text()
    assert "demo_curves.png" in text
    raw, ema = numbers["raw"], numbers["ema"]
    final = [f"{raw['final_accuracy_pct']:.1f}%", f"{ema['final_accuracy_pct']:.1f}%"]
    assert all(value in text for value in final), (page.name, final)
    # every accuracy or noise figure in the paragraphs around the figure is one of the run's
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if "demo_curves.png" in line)
    near = " ".join(lines[max(0, at - 8) : at + 8])
    quoted = set(re.findall(r"\b\d+\.\d%", near)) | set(re.findall(r"(?<![=\d.])\d\.\d\d(?![\d.])", near))
    assert quoted and quoted <= _quoted(numbers), (page.name, sorted(quoted - _quoted(numbers)))


def test_getting_started_quotes_every_number(numbers: dict[str, Any]) -> None:
    text = " ".join((DOCS / "getting-started.md").read_text().split())
    raw, ema = numbers["raw"], numbers["ema"]
    assert (
        f"final validation accuracy {raw['final_accuracy_pct']:.1f}% raw vs {ema['final_accuracy_pct']:.1f}% EMA "
        f"(best {raw['best_accuracy_pct']:.1f}% vs {ema['best_accuracy_pct']:.1f}%)"
    ) in text
    assert f"{raw['noise_pp']:.2f} percentage points raw vs {ema['noise_pp']:.2f} with the EMA" in text


def test_readme_and_getting_started_give_the_same_test_time() -> None:
    said = [re.findall(r"about (\d+)–(\d+) minutes on 2 CPU cores", page.read_text()) for page in PAGES[:2]]
    assert said[0] and said[0] == said[1], said


@pytest.mark.slow
def test_a_rerun_on_the_figures_processor_gives_its_numbers(numbers: dict[str, Any], tmp_path: Path) -> None:
    """The figure's numbers are reproduced by the demo at its defaults on the processor and torch they record."""
    from emakit.demo.config import DemoConfig
    from emakit.demo.figure import figure_numbers, machine
    from emakit.demo.run import run_demo

    if machine() != numbers["machine"]:
        pytest.skip(f"the figure was made on {numbers['machine']}, this is {machine()}")
    config = DemoConfig(out=tmp_path / "run", plot=False, progress=False)
    rerun = figure_numbers(run_demo(config).summary, numbers["config"])
    assert rerun == numbers
