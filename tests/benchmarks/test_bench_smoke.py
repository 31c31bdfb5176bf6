"""`emakit bench --quick` runs and prints tables whose rows parse (timings are printed, never asserted)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from torch import nn

from emakit import bench
from emakit.bench import peers
from emakit.bench.rules import rule_rows, writeback_rows

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


def test_quick_run_prints_parseable_tables_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--no-peers"]) == 0
    captured = capsys.readouterr()
    parsed = tables(captured.out)
    shapes = [t for t in parsed if t.startswith("update cost, ")]
    assert [t.split(",")[1].split(":")[0].strip() for t in shapes] == list(bench.SHAPES)
    assert all(t.endswith("figures not representative]") for t in parsed)  # quick figures are marked
    for title in shapes:
        rows = dict(parsed[title])
        assert rows["limit: one flat lerp_ over the same elements"][1] == pytest.approx(1.0)
        assert rows["floor: foreach lerp_ over pre-built lists, no_grad"][2] == pytest.approx(1.0)
        for name in (
            "emakit compute_ema (models as they are)",
            "emakit EMA.update (model as is)",
            "emakit EMA.update, flatten_model=True",
            "emakit compute_ema, both models flattened",
            "per-parameter copy_(e*s + p*(1-s))",
        ):
            ms, x_limit, x_floor = rows[name]
            assert ms > 0 and x_limit > 0 and x_floor > 0, name
    checks = [t for t in parsed if t.startswith("non-finite check")]
    assert len(checks) == len(bench.SHAPES) and all(len(parsed[t]) == 3 for t in checks)
    (share,) = [t for t in parsed if t.startswith("EMA update as a share")]
    assert len(parsed[share]) == 4 and all(0 < row[2] < 100 for _, row in parsed[share])
    (overlap,) = [t for t in parsed if t.startswith("EMA update overlapped with the next step")]
    assert [name.split(",")[0].split(" ")[0] for name, _ in parsed[overlap]] == ["demo", "MLP", "resnet50-like"]
    for _, (step, update, with_update, with_overlap, exposed) in parsed[overlap]:
        assert min(step, update, with_update, with_overlap) > 0
        assert exposed == pytest.approx(with_overlap - step, abs=0.1)  # cells keep 0.1 to 0.001 ms
    (several,) = [t for t in parsed if t.startswith("several averages in one update")]
    assert [name for name, _ in parsed[several]] == [
        f"k={k}: {what}"
        for k in (2, 4)
        for what in (
            f"floor, {k} foreach lerp_ over pre-built lists",
            "one EMA, one pass, model not flattened",
            f"{k} separate EMAs, model not flattened",
            "one EMA, one pass, flattened",
            f"{k} separate EMAs, flattened",
        )
    ]
    rows = dict(parsed[several])
    for name, (ms, x_limit, x_floor, x_separate) in rows.items():
        k = int(name[2])
        floor = rows[f"k={k}: floor, {k} foreach lerp_ over pre-built lists"][0]
        layout = "flattened" if name.endswith(", flattened") else "model not flattened"
        apart = rows[f"k={k}: {k} separate EMAs, {layout}"][0]
        assert ms > 0 and x_limit > 0, name
        assert x_floor == pytest.approx(ms / floor, rel=0.02, abs=0.002), name  # cells keep 3 decimals
        assert x_separate == pytest.approx(ms / apart, rel=0.02, abs=0.002), name
    sections = [line for line in captured.err.splitlines() if line.startswith("[")]
    total = len(bench.SHAPES) + 6  # the shapes, step share, mixed precision, overlap, several averages, rules, CUDA
    assert sections[0] == f"[1/{total}] shape resnet ..." and sections[-1] == f"[{total}/{total}] CUDA ..."
    assert len(sections) == total and "peer" not in captured.out


def test_rules_only_prints_each_rule_and_write_back_next_to_a_plain_ema(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--rules-only", "--repeats", "2"]) == 0
    captured = capsys.readouterr()
    (title,) = tables(captured.out)
    assert title.startswith("rules and write-back per update, ") and title.endswith("figures not representative]")
    rows = tables(captured.out)[title]
    assert [name for name, _ in rows] == [*rule_rows(), *list(writeback_rows())[1:]]  # the plain EMA once
    assert rows[0][1][1] == 1.0  # the plain EMA is the reference
    for name, (ms, ratio) in rows:
        assert ms > 0 and ratio == pytest.approx(ms / rows[0][1][0], rel=0.02, abs=0.002), name
    assert "BEMA theta_0 of a float32 model: 4.000 bytes per parameter" in captured.out
    assert [line for line in captured.err.splitlines() if line.startswith("[")] == ["[1/1] rules and write-back ..."]
    assert "peer" not in captured.out


def test_peers_are_imported_once_and_a_skipped_one_is_listed_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing() -> tuple[peers.Peer, str]:
        raise ModuleNotFoundError("No module named 'not_a_peer'")

    loads: list[str] = []

    def counted() -> tuple[peers.Peer, str]:
        loads.append("x")
        return peers._averaged_model()

    monkeypatch.setattr(
        peers, "PEERS", [("peer: torch AveragedModel", counted), ("peer: not installed", missing)], raising=True
    )
    argv = ["--quick", "--shapes", "many,mlp", "--no-step", "--no-mixed", "--no-overlap", "--repeats", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert loads == ["x"]
    assert out.count("skipped not installed: ModuleNotFoundError: No module named 'not_a_peer'") == 1
    parsed = tables(out)
    for title in [t for t in parsed if t.startswith("update cost, ")]:
        assert "peer: torch AveragedModel" in dict(parsed[title])


def test_options_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "resnet,alexnet"])
    assert (
        "--shapes: expected a comma-separated subset of resnet,vit,many,mlp, got 'resnet,alexnet'"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--rules-only", "--no-rules"])
    assert "--rules-only and --no-rules: give one of them, not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--cpu-time", "--threads", "2"])
    assert "--cpu-time: counts only the calling thread's work, so it needs --threads 1" in capsys.readouterr().err


def test_a_single_shape_without_peers_or_extras(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--shapes", "mlp", "--no-peers", "--no-step", "--repeats", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| limit: one flat lerp_ over the same elements |" in out
    assert "update cost, resnet" not in out and "peer:" not in out


def test_a_peer_package_imports_with_stand_ins_for_what_it_does_not_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How Composer is imported without torchvision: empty stand-ins during the import only."""
    package = tmp_path / "_emakit_fake_peer"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from _emakit_absent_dep.sub import Thing\nimport _emakit_absent_dep\n\ndef answer():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    finders = list(sys.meta_path)
    module = peers._import_with_stand_ins("_emakit_fake_peer", ["_emakit_absent_dep"])
    assert module.answer() == 42
    assert sys.meta_path == finders
    assert not any(name.startswith("_emakit_absent_dep") for name in sys.modules)
    with pytest.raises(ModuleNotFoundError):
        __import__("_emakit_absent_dep")
    monkeypatch.delitem(sys.modules, "_emakit_fake_peer")


def test_shapes_have_the_advertised_tensor_counts() -> None:
    counts = {shape: len(bench.shapes.tracked(bench.build_model(shape))) for shape in ("many", "mlp")}
    assert counts == {"many": 4000, "mlp": 9}
    resnet = bench.build_model("resnet", quick=True)
    assert len([t for t in bench.shapes.tracked(resnet) if isinstance(t, nn.Parameter)]) == 161
