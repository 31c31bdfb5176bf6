"""`emakit bench --quick` runs and prints tables whose rows parse (timings are printed, never asserted)."""

from __future__ import annotations

import re

import pytest

from emakit import bench

ROW = re.compile(r"^(?P<name>\S.*?)\s{2,}(?P<values>-?[\d.]+(?:\s+-?[\d.]+)*)$")


def tables(text: str) -> dict[str, list[tuple[str, list[float]]]]:
    """Parse ``== title`` / header / dashes / rows blocks into {title: [(row name, numbers)]}."""
    out: dict[str, list[tuple[str, list[float]]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("== "):
            title, rows = lines[i][3:], []
            assert set(lines[i + 2]) == {"-"}, lines[i + 2]
            i += 3
            while i < len(lines) and lines[i].strip() and not lines[i].startswith("   note:"):
                match = ROW.match(lines[i])
                assert match, f"row does not parse: {lines[i]!r}"
                rows.append((match["name"], [float(v) for v in match["values"].split()]))
                i += 1
            out[title] = rows
        i += 1
    return out


def test_quick_run_prints_parseable_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick"]) == 0
    parsed = tables(capsys.readouterr().out)
    shapes = [t for t in parsed if t.startswith("update cost, ")]
    assert [t.split(",")[1].split(":")[0].strip() for t in shapes] == list(bench.SHAPES)
    for title in shapes:
        rows = dict(parsed[title])
        assert rows["limit: one flat lerp_ over the same elements"][1] == pytest.approx(1.0)
        for name in (
            "emakit EMA.update, flatten_model=True",
            "emakit EMA.update (model as is)",
            "emakit compute_ema, both models flattened",
            "per-parameter copy_(e*s + p*(1-s))",
        ):
            ms, ratio = rows[name]
            assert ms > 0 and ratio > 0, name
    checks = [t for t in parsed if t.startswith("non-finite check")]
    assert len(checks) == len(bench.SHAPES) and all(len(parsed[t]) == 3 for t in checks)
    (share,) = [t for t in parsed if t.startswith("EMA update as a share")]
    assert len(parsed[share]) == 4 and all(0 < row[2] < 100 for _, row in parsed[share])
    (overlap,) = [t for t in parsed if t.startswith("EMA update overlapped with the next step")]
    assert [name.split(",")[0].split(" ")[0] for name, _ in parsed[overlap]] == ["demo", "MLP", "resnet50-like"]
    for _, (step, update, with_update, with_overlap, exposed) in parsed[overlap]:
        assert min(step, update, with_update, with_overlap) > 0
        assert exposed == pytest.approx(with_overlap - step, abs=0.1)  # cells keep 0.1 to 0.001 ms


def test_options_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "resnet,alexnet"])
    assert (
        "--shapes: expected a comma-separated subset of resnet,vit,many, got 'resnet,alexnet'"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats: must be at least 1, got 0" in capsys.readouterr().err


def test_a_single_shape_without_peers_or_extras(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--shapes", "many", "--no-peers", "--no-step", "--repeats", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| limit: one flat lerp_ over the same elements |" in out
    assert "update cost, resnet" not in out and "peer:" not in out
