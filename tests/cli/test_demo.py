"""`emakit demo`: the data split, the recorded raw/EMA curves, the files it writes, its errors, and the EMA effect."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emakit.checkpoint import load_checkpoint_file
from emakit.cli import main
from emakit.demo import DemoConfig, build_model, load_data, noise, run_demo, summarize
from emakit.demo.data import load_digits_arrays, split_arrays
from emakit.trainer import evaluate

RECORD_FIELDS = {
    "batch": int,
    "epoch": float,
    "samples": int,
    "train_loss": float,
    "raw_loss": float,
    "raw_accuracy": float,
    "ema_loss": float,
    "ema_accuracy": float,
    "ema_started": bool,
}


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "emakit", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def _read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]


def _second_half_noise(values: list[float], batches: list[int], total: int) -> float:
    """Reference for the demo's noise figure, written with numpy: std of successive differences, in pp."""
    late = np.asarray([v for v, b in zip(values, batches, strict=True) if b > total / 2])
    return float(np.std(np.diff(late)) * 100)


# ---------------------------------------------------------------------------------------------- data


def test_digits_fast_path_equals_sklearn_load_digits() -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits_arrays()
    digits = load_digits()
    np.testing.assert_array_equal(x, digits.images)
    np.testing.assert_array_equal(y, digits.target)


def test_digits_split_is_fixed_stratified_and_standardised() -> None:
    a, b = load_data(), load_data()
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.y_train) + len(a.y_val) == 1797
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    val_counts = torch.bincount(a.y_val, minlength=10).double()
    all_counts = val_counts + torch.bincount(a.y_train, minlength=10).double()
    assert torch.all((val_counts - 0.2 * all_counts).abs() <= 0.5 + 1e-9)  # 20% of each class, rounded
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-3
    train_idx, val_idx = split_arrays(load_digits_arrays()[1])
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == 1797


@pytest.mark.parametrize(
    ("x_shape", "model_input"),
    [((40, 6, 6), (1, 6, 6)), ((40, 3, 5, 5), (3, 5, 5)), ((40, 7), (7,))],
)
def test_npz_images_and_features(tmp_path: Path, x_shape: tuple[int, ...], model_input: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    labels = np.array(["cat", "dog"])[np.arange(40) % 2]
    np.savez(tmp_path / "d.npz", x=rng.normal(size=x_shape).astype(np.float64), y=labels)
    data = load_data(tmp_path / "d.npz")
    assert data.input_shape == model_input
    assert data.classes == ["cat", "dog"]
    assert len(data.y_val) == 8 and len(data.y_train) == 32
    model = build_model(data.input_shape, data.num_classes)
    assert model(data.x_val).shape == (8, 2)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((10, 4))}, "has no array 'y'"),
        ({"x": np.zeros(10), "y": np.arange(10) % 2}, r"'x' must have shape"),
        ({"x": np.zeros((10, 4)), "y": np.arange(9) % 2}, "same length"),
        ({"x": np.zeros((10, 4)), "y": np.zeros((10, 2), int)}, r"'y' must be one class label per sample"),
        ({"x": np.zeros((10, 4)), "y": np.zeros(10, int)}, "at least 2 classes"),
        ({"x": np.full((10, 4), np.nan), "y": np.arange(10) % 2}, "NaN"),
        ({"x": np.zeros((10, 4)), "y": np.arange(10) * 0.5}, "integer or string class labels"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_data(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------- noise / summary


def test_noise_matches_numpy_and_closed_form() -> None:
    assert noise([0.0, 1.0, 0.0, 1.0, 0.0]) == pytest.approx(1.0)  # diffs +1,-1,+1,-1: mean 0, std 1
    assert noise([0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0, abs=1e-12)  # a straight line has no jitter
    values = list(np.random.default_rng(1).random(50))
    assert noise(values) == pytest.approx(float(np.std(np.diff(values))))
    assert math.isnan(noise([1.0, 2.0]))


def test_summarize_uses_second_half_and_only_started_ema() -> None:
    records = [
        {"batch": b, "raw_accuracy": ra, "ema_accuracy": ea, "raw_loss": 1.0, "ema_loss": 0.5, "train_loss": 1.0,
         "ema_started": b >= 20}
        for b, ra, ea in [(10, 0.5, 0.5), (20, 0.9, 0.6), (30, 0.7, 0.7), (40, 0.9, 0.8), (50, 0.6, 0.85), (60, 0.9, 0.9)]
    ]  # fmt: skip
    s = summarize(records, total_batches=60)
    assert s["raw"]["final_accuracy"] == 0.9 and s["raw"]["best_accuracy"] == 0.9 and s["raw"]["best_batch"] == 20
    assert s["ema"]["best_batch"] == 60
    assert s["raw"]["noise_pp"] == pytest.approx(100 * np.std(np.diff([0.9, 0.6, 0.9])))  # batches 40, 50, 60
    assert s["ema"]["noise_pp"] == pytest.approx(100 * np.std(np.diff([0.8, 0.85, 0.9])))
    assert s["non_finite_evaluations"] == 0


# ---------------------------------------------------------------------------------------------- a run, in process


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "run"
    config = DemoConfig(out=out, epochs=1, eval_interval=10, ema_start="30ba", plot=False, progress=False)
    threads = torch.get_num_threads()
    result = run_demo(config)
    assert torch.get_num_threads() == threads  # the demo's one-thread setting does not leak
    return result


def test_records_raw_weights_and_ema_weights_from_the_same_run(short_run) -> None:
    records, trainer, ema, data = short_run.records, short_run.trainer, short_run.ema, short_run.data
    batches = [r["batch"] for r in records]
    assert batches == [*range(10, 90, 10), 89]  # every 10 batches, and the last batch (89 = 1438 // 16)
    # Before the EMA starts at batch 30 both numbers are the raw weights'; afterwards they are measured apart.
    for r in records:
        assert r["ema_started"] == (r["batch"] >= 30)
        if not r["ema_started"]:
            assert (r["ema_accuracy"], r["ema_loss"]) == (r["raw_accuracy"], r["raw_loss"])
    assert any(r["ema_loss"] != r["raw_loss"] for r in records if r["ema_started"])
    # The last record matches an independent evaluation of the training weights and of ema.ema_model.
    _, val_loader = _val_loader(data)
    raw = evaluate(trainer.state.model, val_loader)
    emam = evaluate(ema.ema_model, val_loader)
    assert records[-1]["raw_accuracy"] == raw["eval/accuracy"]
    assert records[-1]["raw_loss"] == pytest.approx(raw["eval/loss"], rel=1e-5)
    assert records[-1]["ema_accuracy"] == emam["eval/accuracy"]
    assert records[-1]["ema_loss"] == pytest.approx(emam["eval/loss"], rel=1e-5)


def _val_loader(data):
    from torch.utils.data import DataLoader, TensorDataset

    return None, DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=512)


def test_safetensors_reproduce_the_ema_model(short_run) -> None:
    tensors = load_file(short_run.files["ema_weights"])
    model = build_model(short_run.data.input_shape, short_run.data.num_classes)
    model.load_state_dict(tensors)  # strict: exactly the model's state_dict names
    model.eval()
    x = short_run.data.x_val
    with torch.no_grad():
        assert torch.equal(model(x), short_run.ema.ema_model(x))
    assert int(tensors["features.1.num_batches_tracked"]) == 89  # integer buffer copied, not averaged


def test_checkpoint_publishes_the_ema_weights(short_run) -> None:
    checkpoint = load_checkpoint_file(short_run.files["checkpoint"])
    assert short_run.files["checkpoint"].name == "ep1-ba89.pt"
    assert (short_run.files["checkpoint"].parent / "latest.pt").resolve() == short_run.files["checkpoint"].resolve()
    ema_tensors = load_file(short_run.files["ema_weights"])
    published = checkpoint["state"]["model"]
    assert published.keys() == ema_tensors.keys()
    for name, tensor in ema_tensors.items():
        assert torch.equal(published[name], tensor), name
    training = checkpoint["state"]["algorithms"]["EMA"]["training_weights"]
    own = short_run.trainer.state.model.state_dict()
    for name, tensor in training.items():
        assert torch.equal(tensor, own[name]), name


def test_jsonl_matches_records_and_summary(short_run) -> None:
    assert _read_jsonl(short_run.files["metrics"]) == short_run.records
    summary = json.loads(short_run.files["summary"].read_text())
    assert summary["raw"]["final_accuracy"] == short_run.records[-1]["raw_accuracy"]
    assert summary["config"]["epochs"] == 1


# ---------------------------------------------------------------------------------------------- CLI errors (in process)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--half-life", "-5ba"], "--half-life"),
        (["--half-life=0ba"], "--half-life"),
        (["--half-life", "abc"], "--half-life"),
        (["--half-life", "20"], "--half-life"),
        (["--half-life", "0.5dur"], "--half-life"),
        (["--update-interval", "2ep"], "--update-interval"),
        (["--ema-start", "10ep"], "--ema-start"),
        (["--ema-start", "-1ba"], "--ema-start"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-3"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.5"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "1"], "--batch-size"),
        (["--batch-size", "100000"], "--batch-size"),
        (["--eval-interval", "0"], "--eval-interval"),
        (["--seed", "-1"], "--seed"),
        (["--device", "nonsense"], "--device"),
        (["--data", "/definitely/missing.npz"], "--data"),
        (["--name", "a/b"], "--name"),
    ],
)
def test_bad_values_exit_2_naming_the_option(
    args: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *args, "--out", str(tmp_path / "r")] if "--name" not in args else ["demo", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emakit demo: error: {option}"), err
    assert err.count("\n") == 1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((10, 4))}, "'y'"),
        ({"x": np.zeros((10, 2, 2, 2, 2)), "y": np.arange(10) % 2}, "shape"),
        ({"x": np.zeros((10, 4)), "y": np.arange(7) % 2}, "length"),
    ],
)
def test_bad_npz_exits_2_naming_data(
    arrays: dict, match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("emakit demo: error: --data: ") and match in err and err.count("\n") == 1


def test_existing_run_folder_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == "{}\n"


# ---------------------------------------------------------------------------------------------- bench dispatch


def test_bench_unavailable_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "emakit.bench", None)  # makes `import emakit.bench` raise ImportError
    assert main(["bench", "--anything"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emakit bench: error:") and err.count("\n") == 1


def test_bench_gets_the_remaining_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("emakit.bench")
    fake.main = lambda argv: seen.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "emakit.bench", fake)
    import emakit

    monkeypatch.setattr(emakit, "bench", fake, raising=False)
    assert main(["bench", "--quick", "x"]) == 7
    assert seen == [["--quick", "x"]]


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["demo", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--epochs", "--half-life", "--update-interval", "--ema-start", "--lr", "--batch-size", "--seed",
                   "--out", "--name", "--device", "--no-plot", "--data", "ema_weights.safetensors"):  # fmt: skip
        assert option in out, option
    assert main([]) == 2


# ---------------------------------------------------------------------------------------------- the CLI, in a subprocess


@pytest.mark.slow
def test_cli_short_run_writes_wellformed_files(tmp_path: Path) -> None:
    out = tmp_path / "short"
    proc = _run_cli("demo", "--epochs", "1", "--eval-interval", "5", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "wall time:" in proc.stdout and "EMA weights" in proc.stdout

    records = _read_jsonl(out / "metrics.jsonl")
    assert [r["batch"] for r in records] == [*range(5, 90, 5), 89]
    for r in records:
        assert set(r) == set(RECORD_FIELDS)
        for key, kind in RECORD_FIELDS.items():
            assert isinstance(r[key], kind) and not (kind is int and isinstance(r[key], bool)), (key, r[key])
        assert 0.0 <= r["raw_accuracy"] <= 1.0 and 0.0 <= r["ema_accuracy"] <= 1.0
        assert r["epoch"] == pytest.approx(r["batch"] / 89, abs=1e-4) and r["samples"] == 16 * r["batch"]
        assert r["ema_started"]  # default ema_start 0.0dur: the EMA starts at the first batch

    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    image = matplotlib.image.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600

    # The safetensors rebuild the model the demo trained and reproduce its EMA evaluation exactly.
    data = load_data()
    model = build_model(data.input_shape, data.num_classes)
    model.load_state_dict(load_file(out / "ema_weights.safetensors"))
    _, val_loader = _val_loader(data)
    metrics = evaluate(model, val_loader)
    assert metrics["eval/accuracy"] == records[-1]["ema_accuracy"]
    assert metrics["eval/loss"] == pytest.approx(records[-1]["ema_loss"], rel=1e-5)
    published = build_model(data.input_shape, data.num_classes)
    published.load_state_dict(load_checkpoint_file(out / "checkpoints" / "latest.pt")["state"]["model"])
    model.eval(), published.eval()
    with torch.no_grad():
        assert torch.equal(model(data.x_val), published(data.x_val))


@pytest.mark.slow
def test_cli_errors_in_a_subprocess_have_no_traceback(tmp_path: Path) -> None:
    np.savez(tmp_path / "noxy.npz", a=np.zeros(3))
    for args, option in (
        (["--half-life", "-10ba"], "--half-life"),
        (["--data", str(tmp_path / "noxy.npz")], "--data"),
        (["--epochs", "0"], "--epochs"),
    ):
        proc = _run_cli("demo", *args, "--out", str(tmp_path / "r"), cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
        assert proc.stderr.startswith(f"emakit demo: error: {option}") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_default_run_ema_curve_is_less_noisy(tmp_path: Path) -> None:
    """The default configuration (no plot, to save a second), on the default seed."""
    out = tmp_path / "default"
    proc = _run_cli("demo", "--no-plot", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = _read_jsonl(out / "metrics.jsonl")
    batches = [r["batch"] for r in records]
    total = batches[-1]
    assert total == 445
    raw_noise = _second_half_noise([r["raw_accuracy"] for r in records], batches, total)
    ema_noise = _second_half_noise([r["ema_accuracy"] for r in records], batches, total)
    assert ema_noise < 0.5 * raw_noise, (raw_noise, ema_noise)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["raw"]["noise_pp"] == pytest.approx(raw_noise)
    assert summary["ema"]["noise_pp"] == pytest.approx(ema_noise)
    assert f"{raw_noise:.2f}" in proc.stdout and f"{ema_noise:.2f}" in proc.stdout


def test_demo_help_names_the_posthoc_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert re.search(r"--posthoc\s+run the post-hoc EMA demo", capsys.readouterr().out)


def test_demo_wall_time_counts_from_the_command_not_the_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process is older than the command (the clock reads 5000 s at its start): only the command's time is printed."""
    readings = iter([5000.0, 5002.5])
    monkeypatch.setattr("emakit.cli._clock", lambda: next(readings))
    assert main(["demo", "--epochs", "1", "--eval-interval", "50", "--no-plot", "--out", str(tmp_path / "r")]) == 0
    match = re.search(r"wall time: ([0-9.]+) s since the command started", capsys.readouterr().out)
    assert match is not None
    assert match.group(1) == "2.5"
