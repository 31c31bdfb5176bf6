"""The sweep's other candidates and its figure: the raw weights, BEMA and windows T0:T1 as candidates, refused
before any evaluation when the snapshots cannot serve them; the plot as EDM2's (the metric against sigma_rel on a log
axis), and a sweep without matplotlib (a warning, the table, no plot)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _runs import probe

from emakit import EMA
from emakit.posthoc.cli import main
from emakit.posthoc.profiles import SIGMA_REL_MAX
from emakit.posthoc.reconstruction import reconstruct
from emakit.posthoc.sweep import check_candidate, sweep

UPDATES = 200


def probe_folder(folder: Path, raw: bool) -> Path:
    """A one-parameter model holding e_k after update k: an average of it is the weight it gives each update."""
    model, step = probe(UPDATES)
    ema = EMA(sigma_rel=[0.05, 0.10, SIGMA_REL_MAX], snapshot_interval="10ba", snapshot_folder=folder, snapshot_raw=raw)
    ema.attach(model)
    for k in range(1, UPDATES + 1):
        step(k)
        ema.step()
    return folder


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return probe_folder(tmp_path_factory.mktemp("raw"), raw=True)


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return probe_folder(tmp_path_factory.mktemp("plain"), raw=False)


def distance_to_last(weights: dict[str, torch.Tensor]) -> float:
    """How far the average is from the last update's weights (e_200): 0 only for the raw weights."""
    target = np.zeros(UPDATES)
    target[-1] = 1.0
    return float(np.linalg.norm(weights["w"].double().numpy() - target))


def test_raw_weights_bema_and_windows_are_candidates(raw_folder: Path) -> None:
    candidates: list[Any] = ["power:0.05", "window:150:200", (100, 160), "bema", "raw", "tracked"]
    result = sweep(raw_folder, distance_to_last, candidates, progress=False)
    labels = [r["candidate"] for r in result.rows]
    assert labels[:5] == ["power:0.05", "window:150:200", "window:100:160", "bema", "raw"]
    assert result.best is not None and result.best["candidate"] == "raw" and result.best["metric"] == 0.0
    assert result.best["fit_error"] == 0.0 and result.best["target"] == {"kind": "raw", "params": []}
    assert [r["t"] for r in result.rows[:5]] == [200, 200, 160, 200, 200]  # a window at its own end
    by_label = {r["candidate"]: r["metric"] for r in result.rows}
    expected = reconstruct(raw_folder, window=(100, 160))["w"]
    assert by_label["window:100:160"] == pytest.approx(distance_to_last({"w": expected}), rel=1e-12)
    # BEMA is nearer the last weights than any average of the past (its correction extrapolates towards them)
    assert by_label["bema"] < min(v for k, v in by_label.items() if k not in ("raw", "bema"))


def test_candidates_the_snapshots_cannot_serve_are_refused_before_any_evaluation(plain_folder: Path) -> None:
    def evaluate(weights: dict[str, torch.Tensor]) -> float:
        raise AssertionError("nothing may be evaluated")

    with pytest.raises(
        ValueError,
        match=r"2 of 3 candidates cannot be reconstructed:\n  raw: kernel raw weighs the raw training weights, which "
        r"the snapshots in .* do not hold .*\n  bema: kernel bema:10.0,1.0,0.5,0.2 weighs the raw",
    ):
        sweep(plain_folder, evaluate, ["power:0.1", "raw", "bema"], progress=False)
    with pytest.raises(ValueError, match=r"window:0:300: t=300 is after the last snapshot"):
        sweep(plain_folder, evaluate, ["window:0:300"], progress=False)


@pytest.mark.parametrize("text", ["window:5:2", "window:1", "window:a:b", "window:-1:4"])
def test_a_bad_window_candidate_names_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"a window candidate is 'window:T0:T1' or \(T0, T1\) with 0 <= T0 < T1"):
        check_candidate(text)
    check_candidate("window:0:7")
    check_candidate("raw")
    check_candidate("tracked")


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import matplotlib.pyplot as plt

    closed: list[Any] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (closed.append(fig), close(fig)))
    return closed


def test_the_plot_is_the_metric_against_sigma_rel_on_a_log_axis(
    raw_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    closed = capture_figures(monkeypatch)
    candidates = ["power:0.2", "power:0.03", "cosine:0.2", "power:0.1", "raw"]
    result = sweep(raw_folder, distance_to_last, candidates, out=tmp_path, progress=False)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = closed[-1].axes
    assert ax.get_xscale() == "log"
    curve = ax.get_lines()[0]
    by_label = {r["candidate"]: r["metric"] for r in result.rows}
    assert list(curve.get_xdata()) == pytest.approx([0.03, 0.1, 0.2])
    assert list(curve.get_ydata()) == [by_label[f"power:{s}"] for s in ("0.03", "0.1", "0.2")]
    lines = {line.get_label(): line for line in ax.get_lines()[1:]}
    assert set(lines) >= {"cosine:0.2", "raw", "best: raw"}
    assert list(lines["cosine:0.2"].get_ydata()) == [by_label["cosine:0.2"]] * 2  # a horizontal line
    # without power candidates: the metric against the candidates in order
    sweep(raw_folder, distance_to_last, ["cosine:0.2", "raw"], out=tmp_path / "b", progress=False)
    (ax,) = closed[-1].axes
    assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.get_xticklabels()] == ["cosine:0.2", "raw"]


def test_without_matplotlib_the_sweep_writes_its_table_and_warns(
    raw_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.warns(
        UserWarning, match=r"matplotlib is not installed: the sweep wrote its table to .* but no sweep.png"
    ):
        result = sweep(raw_folder, distance_to_last, ["raw", "power:0.1"], out=tmp_path, progress=False)
    assert "plot" not in result.files and not (tmp_path / "sweep.png").exists()
    assert [r["candidate"] for r in json.loads((tmp_path / "sweep.json").read_text())["rows"]] == ["raw", "power:0.1"]


def test_the_cli_takes_the_new_candidates(
    raw_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "near_last.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def score(weights):
                w = weights["w"].double().numpy()
                return float(np.linalg.norm(w - np.eye(len(w))[-1]))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    candidates = ["power:0.1", "window:150:200", "bema:10,1,0.5,0.2", "raw"]
    args = [str(raw_folder), "--metric", "near_last:score", "--candidates", *candidates, "--table", "t"]
    assert main(args) == 0
    table = json.loads((tmp_path / "t" / "sweep.json").read_text())
    python = sweep(raw_folder, distance_to_last, candidates, progress=False)
    assert [r["metric"] for r in table["rows"]] == pytest.approx([r["metric"] for r in python.rows], rel=1e-12)
    assert table["best"] == "raw"
    assert main([*args[:-4], "--candidates", "window:9:3"]) == 2
    assert "--candidates: a window candidate is 'window:T0:T1'" in capsys.readouterr().err
