"""Choosing the best average by a metric: the known best is picked, a raising evaluation keeps the table so far,
and ``emakit posthoc --metric`` writes the table the Python API returns."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import probe
from safetensors.torch import load_file

from emakit import EMA
from emakit.posthoc.cli import main
from emakit.posthoc.profiles import SIGMA_REL_MAX
from emakit.posthoc.reconstruction import plan_reconstruction, reconstruct
from emakit.posthoc.sweep import SweepError, sigma_rel_grid, sweep

UPDATES = 200
CANDIDATES = ["power:0.05", "cosine:0.05", "cosine:0.2", "linear:0.5", "uniform:0.1", "tracked"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-parameter model holding e_k after update k: an average of it is the weight it gives each update."""
    out = tmp_path_factory.mktemp("sweep")
    model, step = probe(UPDATES)
    ema = EMA(sigma_rel=[0.05, 0.10, SIGMA_REL_MAX], snapshot_interval="10ba", snapshot_folder=out)
    ema.attach(model)
    for k in range(1, UPDATES + 1):
        step(k)
        ema.step()
    return out


def cosine_oracle() -> np.ndarray:
    """WSM's weights for a cosine decay over the last 20%, from its definition: the multiplier's drop per update."""
    k = np.arange(1, UPDATES + 1)

    def lr(u: np.ndarray) -> np.ndarray:
        return (1 + np.cos(np.pi * np.clip((u - 0.8) / 0.2, 0, 1))) / 2

    return lr((k - 1) / UPDATES) - lr(k / UPDATES)


def distance_to_cosine(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    w = weights["w"].double().numpy()
    return {"distance": float(np.linalg.norm(w - cosine_oracle())), "late": float(w[160:].sum())}


def test_the_sweep_picks_the_known_best_and_writes_the_table(folder: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    result = sweep(
        folder,
        distance_to_cosine,
        CANDIDATES,
        metric="distance",
        out=tmp_path / "t",
        export=tmp_path / "best.safetensors",
        progress=lines.append,
    )
    labels = [r["candidate"] for r in result.rows]
    assert labels[:5] == CANDIDATES[:5] and len(labels) == 8
    assert all(label.startswith("tracked power:") for label in labels[5:])  # the three tracked profiles
    assert [r["fit_error"] for r in result.rows[5:]] == pytest.approx([0, 0, 0], abs=1e-6)  # exact at a snapshot
    distances = [r["distance"] for r in result.rows]
    assert result.best is not None and result.best["candidate"] == "cosine:0.2"
    assert result.best["distance"] == min(distances) and sorted(distances)[1] > 10 * min(distances)
    for row, label in zip(result.rows, CANDIDATES[:5], strict=False):
        assert row["fit_error"] == plan_reconstruction(folder, kernel=label).fit_error
    assert len(lines) == 8 and lines[2].startswith("[3/8] cosine:0.2: distance ")
    with (tmp_path / "t" / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["candidate"] for r in table] == labels
    assert [float(r["distance"]) for r in table] == distances
    saved = json.loads((tmp_path / "t" / "sweep.json").read_text())
    assert saved["best"] == "cosine:0.2" and saved["rows"] == result.rows and saved["goal"] == "min"
    assert (tmp_path / "t" / "sweep.png").stat().st_size > 0
    assert torch.equal(load_file(tmp_path / "best.safetensors")["w"], reconstruct(folder, kernel="cosine:0.2")["w"])
    # the other goal, and a metric chosen among several: the most weight on the last 20% of the updates
    late = sweep(folder, distance_to_cosine, CANDIDATES[:5], metric="late", goal="max", progress=False)
    assert late.best is not None and late.best["late"] == max(r["late"] for r in late.rows)


def test_a_raising_evaluation_keeps_the_table_so_far(folder: Path, tmp_path: Path) -> None:
    calls = []

    def evaluate(weights: dict[str, torch.Tensor]) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise ZeroDivisionError("the validation set is empty")
        return float(weights["w"][-1])

    with pytest.raises(
        SweepError,
        match=r"evaluate raised ZeroDivisionError on candidate 3/8 \(cosine:0.2\): the validation set is empty; 2 candidates "
        r"were evaluated before it \(SweepError.result\); the table so far is in .*sweep.csv",
    ) as caught:
        sweep(folder, evaluate, CANDIDATES, out=tmp_path, progress=False)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert [r["candidate"] for r in caught.value.result.rows] == ["power:0.05", "cosine:0.05"]
    with (tmp_path / "sweep.csv").open() as f:
        assert [r["candidate"] for r in csv.DictReader(f)] == ["power:0.05", "cosine:0.05"]


def test_bad_candidates_are_refused_before_any_evaluation(folder: Path, tmp_path: Path) -> None:
    def evaluate(weights: dict[str, torch.Tensor]) -> float:
        raise AssertionError("nothing may be evaluated")

    with pytest.raises(ValueError, match=r"2 of 3 candidates cannot be reconstructed:\n  cosine:2: kernel cosine:"):
        sweep(folder, evaluate, ["cosine:0.2", "cosine:2", "uniform:0.01"], t=195, progress=False)
    with pytest.raises(ValueError, match=r"goal must be 'min' \(a loss\) or 'max' \(an accuracy\), got 'best'"):
        sweep(folder, evaluate, ["cosine:0.2"], goal="best")
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds sweep.json: pass overwrite=True"):
        sweep(folder, evaluate, ["cosine:0.2"], out=tmp_path)
    assert (tmp_path / "sweep.json").read_text() == "{}"


def test_the_cli_writes_the_table_the_python_api_returns(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "my_eval.py"
    module.write_text(
        textwrap.dedent(
            """
            import numpy as np

            def score(weights):
                w = weights["w"].double().numpy()
                return {"late": float(w[160:].sum()), "last": float(w[-1])}
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    args = [str(folder), "--metric", "my_eval:score", "--candidates", *CANDIDATES, "--maximize", "--table", "cli"]
    assert main([*args, "--out", "best.safetensors"]) == 0
    printed = capsys.readouterr().out
    assert "wrote cli/sweep.csv" in printed and "best" in printed
    import my_eval  # type: ignore[import-not-found]

    python = sweep(folder, my_eval.score, CANDIDATES, goal="max", progress=False)
    cli = json.loads((tmp_path / "cli" / "sweep.json").read_text())
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in python.rows]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in cli["rows"]] == strip
    assert cli["best"] == python.best["candidate"] and cli["metric"] == "late"  # type: ignore[index]
    assert torch.equal(
        load_file(tmp_path / "best.safetensors")["w"],
        reconstruct(folder, kernel=cli["best"].removeprefix("tracked "))["w"],
    )
    # a file path works as well; an existing table is refused without --force, replaced with it
    by_path = [str(folder), "--metric", f"{module}:score", "--candidates", "cosine:0.2", "--table", "cli"]
    assert main(by_path) == 2 and "already holds sweep.csv, sweep.json, sweep.png" in capsys.readouterr().err
    assert main([*by_path, "--force"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "nomodule_here:f", "--candidates", "cosine:0.2"], r"--metric 'nomodule_here:f': cannot import"),
        (["--metric", "json", "--candidates", "cosine:0.2"], r"--metric must be MODULE:FUNCTION"),
        (["--metric", "json:nope", "--candidates", "cosine:0.2"], r"'json' has no function 'nope'"),
        (["--metric", "json:dumps"], r"--metric needs --candidates"),
        (["--metric", "json:dumps", "--candidates", "cosine:9"], r"--candidates: kernel cosine: .*got 'cosine:9'"),
        (["--metric", "json:dumps", "--candidates", "x", "--sigma-rel", "0.1"], r"leave out --sigma-rel"),
        (["--sigma-rel", "0.1", "--out", "x.safetensors", "--maximize"], r"go with --metric MODULE:FUNCTION"),
    ],
)
def test_the_cli_names_bad_sweep_options(
    folder: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(folder), *args]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_a_sweep_evaluation_that_raises_exits_1_from_the_cli(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "broken.py"
    module.write_text("def score(weights):\n    raise RuntimeError('no data')\n")
    assert (
        main([str(folder), "--metric", f"{module}:score", "--candidates", "cosine:0.2", "--table", str(tmp_path / "t")])
        == 1
    )
    assert "evaluate raised RuntimeError on candidate 1/1 (cosine:0.2): no data" in capsys.readouterr().err


def test_sigma_rel_grid_is_log_spaced() -> None:
    grid = sigma_rel_grid(0.02, 0.25, 15)
    assert grid[0] == 0.02 and grid[-1] == 0.25 and len(grid) == 15
    ratios = np.diff(np.log(grid))
    assert np.allclose(ratios, ratios.mean(), rtol=0.05)
