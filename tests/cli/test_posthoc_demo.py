"""`emakit demo --posthoc` (emakit.demo.posthoc): the files it writes, the sweep against independent
evaluations of the snapshots, the reconstruction check, the same training as `emakit demo`, and its errors."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from emakit.demo import DemoConfig, build_model, load_data, run_demo
from emakit.demo.config import OptionError
from emakit.demo.posthoc import (
    PLOT_FILE,
    SNAPSHOT_DIR,
    SUMMARY_FILE,
    TRACKED_SIGMA_REL,
    PosthocDemoConfig,
    default_sweep,
    main,
    run_posthoc_demo,
)
from emakit.posthoc import read_snapshot_index, reconstruct
from emakit.trainer import evaluate

EPOCHS = 1  # 89 batches of 16 digits: about 30 snapshots still, in a few seconds


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """One run through the command line: its folder, posthoc.json and what it printed."""
    out = tmp_path_factory.mktemp("posthoc") / "run"
    printed = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(out), "--epochs", str(EPOCHS), "--seed", "0"]) == 0
    assert torch.get_num_threads() == threads  # the one-thread setting does not leak
    return out, json.loads((out / SUMMARY_FILE).read_text()), printed.getvalue()


def _val_loader() -> DataLoader:
    data = load_data()
    return DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=512)


def _evaluate_state(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Evaluate weights in a freshly built demo model (strict load: every name of the model, no other)."""
    data = load_data()
    model = build_model(data.input_shape, data.num_classes)
    model.load_state_dict(state)
    return evaluate(model, _val_loader())


def _last_snapshot_average(folder: Path, j: int) -> dict[str, torch.Tensor]:
    """Average ``j`` as the last snapshot file holds it (``"{j}/{name}"``), read with safetensors alone."""
    last = sorted(folder.glob("snapshot-*.safetensors"))[-1]
    tensors = load_file(str(last))
    return {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{j}/")}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    names = [n for n, v in a.items() if v.is_floating_point()]
    return float(torch.cat([(a[n].double() - b[n].double()).flatten() for n in names]).norm())


# ---------------------------------------------------------------------------------------------- the files


def test_writes_snapshots_plot_and_summary(cli_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, printed = cli_run
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    infos = read_snapshot_index(out / SNAPSHOT_DIR)
    assert len(infos) == summary["num_snapshots"]
    assert 20 <= len(infos) <= 40
    # The averages start at batch 1 and are updated every batch, so t counts batches; the last snapshot is the end.
    total = len(load_data().y_train) // 16 * EPOCHS
    assert summary["total_batches"] == summary["ema_updates"] == total
    assert [i.t for i in infos] == [i.step for i in infos]
    assert infos[-1].t == total
    interval = int(summary["snapshot_interval"].removesuffix("ba"))
    assert [i.t for i in infos[:-1]] == list(range(interval, total, interval))[: len(infos) - 1]
    assert [p.sigma_rel for p in infos[0].profiles] == pytest.approx(TRACKED_SIGMA_REL)
    # The printed table: one line per sigma_rel, the tracked and the best marked.
    lines = [line for line in printed.splitlines() if re.match(r"\s+[\d.]+\s+[\d.]+%\s+[\d.]+\s+[\d.]+%", line)]
    assert len(lines) == len(summary["sweep"])
    assert sum("tracked" in line for line in lines) == 2 and sum("best" in line for line in lines) == 1


def test_the_sweep_covers_the_tracked_profiles_and_names_its_best(cli_run: tuple[Path, dict[str, Any], str]) -> None:
    _, summary, _ = cli_run
    sigmas = [row["sigma_rel"] for row in summary["sweep"]]
    assert sigmas == sorted(set(default_sweep()))
    assert len(sigmas) >= 15 and min(sigmas) == pytest.approx(0.02) and max(sigmas) == pytest.approx(0.25)
    assert [s for s, row in zip(sigmas, summary["sweep"], strict=True) if row["tracked"]] == list(TRACKED_SIGMA_REL)
    accuracies = [row["accuracy"] for row in summary["sweep"]]
    best = summary["best"]
    assert best["accuracy"] == max(accuracies)
    tied = [row for row in summary["sweep"] if row["accuracy"] == best["accuracy"]]
    assert best["loss"] == min(row["loss"] for row in tied)  # ties go to the lower loss
    assert best["sigma_rel"] in sigmas


def test_tracked_profiles_rebuilt_evaluate_like_the_tracked_averages(cli_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = cli_run
    for j, tracked in enumerate(summary["tracked"]):
        # the run: rebuilt from the snapshots vs the EMA's own average swapped into the trained model
        assert tracked["reconstructed_accuracy"] == pytest.approx(tracked["accuracy"], abs=1e-6)
        assert tracked["reconstructed_loss"] == pytest.approx(tracked["loss"], rel=1e-5)
        # independently: the last snapshot file holds the tracked average at the end; evaluate it here
        direct = _evaluate_state(_last_snapshot_average(out / SNAPSHOT_DIR, j))
        assert direct["eval/accuracy"] == pytest.approx(tracked["accuracy"], abs=1e-6)
        assert direct["eval/loss"] == pytest.approx(tracked["loss"], rel=1e-5)


def test_a_swept_average_evaluates_as_reported(cli_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = cli_run
    untracked = [row for row in summary["sweep"] if not row["tracked"]]
    for row in (untracked[0], min(untracked, key=lambda r: abs(r["sigma_rel"] - 0.07)), untracked[-1]):
        metrics = _evaluate_state(reconstruct(out / SNAPSHOT_DIR, sigma_rel=row["sigma_rel"]))
        assert metrics["eval/accuracy"] == pytest.approx(row["accuracy"], abs=1e-6), row
        assert metrics["eval/loss"] == pytest.approx(row["loss"], rel=1e-5), row
    # different widths are different models: the sweep is not one average evaluated many times
    assert len({round(row["loss"], 6) for row in summary["sweep"]}) == len(summary["sweep"])


def test_reconstruction_error_check(cli_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = cli_run
    folder = out / SNAPSHOT_DIR
    finals = [_last_snapshot_average(folder, j) for j in range(2)]
    spread = _distance(finals[0], finals[1])
    assert spread > 0
    check = summary["reconstruction_check"]
    assert check["distance_between_tracked"] == pytest.approx(spread, rel=1e-6)
    for j, sigma in enumerate(TRACKED_SIGMA_REL):
        error = _distance(reconstruct(folder, sigma_rel=sigma), finals[j]) / spread
        assert error <= 0.01
        assert summary["tracked"][j]["reconstruction_error"] == pytest.approx(error, abs=1e-9)
    assert check["max_relative_error"] <= 0.01 and check["ok"] is True
    # Without the last snapshot's own copy the other snapshots must do the work: not exact, but close.
    holdout = [row["holdout_error"] for row in summary["tracked"]]
    assert all(0 < e < 0.05 for e in holdout)
    assert check["max_holdout_error"] == max(holdout)


# ---------------------------------------------------------------------------------------------- the same training


def test_python_api_trains_as_emakit_demo_and_is_reproducible(
    tmp_path: Path, cli_run: tuple[Path, dict[str, Any], str]
) -> None:
    _, from_cli, _ = cli_run
    result = run_posthoc_demo(PosthocDemoConfig(out=tmp_path / "api", epochs=EPOCHS, seed=0, plot=False))
    assert not (tmp_path / "api" / PLOT_FILE).exists()
    written = json.loads((tmp_path / "api" / SUMMARY_FILE).read_text())
    assert {k: v for k, v in result.items() if k != "files"} == written
    assert result["sweep"] == from_cli["sweep"]  # same seed, same numbers, bit for bit
    # emakit demo with the same seed trains the same weights: its final raw evaluation is this run's.
    demo = run_demo(
        DemoConfig(out=tmp_path / "demo", epochs=EPOCHS, seed=0, eval_interval=10**6, plot=False, progress=False)
    )
    assert demo.summary["raw"]["final_accuracy"] == pytest.approx(result["raw_final"]["accuracy"], abs=1e-6)
    assert demo.summary["raw"]["final_loss"] == pytest.approx(result["raw_final"]["loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--epochs", "0"], r"--epochs: must be a positive integer, got '0'"),
        (["--epochs", "two"], r"--epochs: must be a positive integer, got 'two'"),
        (["--seed", "-1"], r"--seed: must be a non-negative integer, got '-1'"),
        (["--threads", "0"], r"--threads: must be a positive integer, got '0'"),
        (["--bogus"], r"unrecognized arguments: --bogus"),
        (["--posthoc", "--epochs", "0"], r"--epochs: must be a positive integer"),  # as `emakit demo` passes it on
    ],
)
def test_bad_options_exit_2_naming_the_option(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emakit demo --posthoc: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("what", ["file", "summary", "snapshots"])
def test_out_must_be_a_fresh_folder(what: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    if what == "file":
        out.write_text("")
        match = "exists and is not a folder"
    else:
        out.mkdir()
        (out / (SUMMARY_FILE if what == "summary" else SNAPSHOT_DIR)).mkdir()
        match = "already holds a post-hoc run"
    assert main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out: {str(out)!r}" in err and match in err


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"epochs": 0}, r"--epochs: must be a positive integer, got 0"),
        ({"seed": -1}, r"--seed: must be a non-negative integer, got -1"),
        ({"threads": 0}, r"--threads: must be a positive integer, got 0"),
        ({"lr": float("nan")}, r"lr: must be a positive finite number, got nan"),
        ({"batch_size": 1}, r"batch_size: must be at least 2"),
        ({"sweep": (0.05, 0.3)}, r"sweep: must be one or more numbers in \(0, 1/sqrt\(12\) = 0.288675\), got \[0.3\]"),
        ({"sweep": ()}, r"sweep: must be one or more numbers"),
    ],
)
def test_python_api_errors_name_the_setting(change: dict[str, Any], match: str, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=match):
        run_posthoc_demo(PosthocDemoConfig(out=tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "sigma_rel 0.05 and 0.1" in text and "posthoc.json" in text and "--no-plot" in text


def test_help_and_option_errors_answer_without_torch() -> None:
    program = (
        "import contextlib, io, sys\n"
        "from emakit.demo.posthoc import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    codes = [main(['--help']), main(['--epochs', '0']), main(['--seed', 'x'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 2, 2] False"
