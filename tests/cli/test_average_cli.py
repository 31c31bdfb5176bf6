"""``emakit average``, end to end: the file it writes equals the naive average; bad input exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emakit.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkpoints(tmp_path: Path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """Three safetensors files of one small model: float32, bfloat16 and an integer counter."""
    found = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        sd = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g).bfloat16(), "n": torch.tensor(i)}
        path = tmp_path / f"ck{i}.safetensors"
        save_file(sd, path)
        found.append((path, sd))
    return found


def naive(state_dicts: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        name: sum(w / total * sd[name].double() for w, sd in zip(weights, state_dicts, strict=True)).to(last.dtype)  # type: ignore[union-attr]
        if last.is_floating_point()
        else last
        for name, last in state_dicts[-1].items()
    }


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_average_writes_the_weighted_mean_and_says_what_it_did(
    checkpoints: list[tuple[Path, dict[str, torch.Tensor]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(p) for p, _ in checkpoints]
    out = tmp_path / "avg.safetensors"
    code, stdout, err = run(["average", *paths, "--weights", "1", "1", "2", "--out", str(out)], capsys)
    assert (code, err) == (0, "")
    got, expected = load_file(out), naive([sd for _, sd in checkpoints], [1, 1, 2])
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert stdout.splitlines()[0] == f"emakit average: 3 checkpoints (training weights) -> {out}"
    assert f"  0.2500  {paths[0]}" in stdout and f"  0.5000  {paths[2]}" in stdout
    assert "2 tensors averaged, 1 integer/bool tensors from the last checkpoint" in stdout


def test_existing_output_needs_force_and_is_kept_aside(
    checkpoints: list[tuple[Path, dict[str, torch.Tensor]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(p) for p, _ in checkpoints]
    out = tmp_path / "avg.pt"
    out.write_bytes(b"keep me")
    code, _, err = run(["average", *paths, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"emakit average: error: out {str(out)!r} exists; pass force=True (--force)")
    code, stdout, err = run(["average", *paths, "--out", str(out), "--force", "--chunk-mb", "1"], capsys)
    assert (code, err) == (0, "")
    assert f"the previous avg.pt is kept as {out}.old" in stdout
    assert Path(f"{out}.old").read_bytes() == b"keep me"
    got, expected = torch.load(out, weights_only=True), naive([sd for _, sd in checkpoints], [1, 1, 1])
    assert all(torch.equal(got[n], v) for n, v in expected.items())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "1", "2"], "--weights: got 2 weights [1.0, 2.0] for 3 checkpoints; give one per checkpoint"),
        (["--weights", "1", "-2", "1"], "--weights: must be a finite number >= 0, got '-2'"),
        (["--weights", "0", "0", "0"], "--weights: all 3 weights are 0; at least one must be positive"),
        (["--weights", "x", "1", "1"], "--weights: must be a finite number >= 0, got 'x'"),
        (["--which", "raw"], "--which: invalid choice: 'raw' (choose from "),  # quoting varies by Python version
        (["--chunk-mb", "0"], "--chunk-mb: must be a positive integer (MiB), got '0'"),
    ],
)
def test_bad_options_are_one_line_errors(
    checkpoints: list[tuple[Path, dict[str, torch.Tensor]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    paths = [str(p) for p, _ in checkpoints]
    code, stdout, err = run(["average", *paths, "--out", str(tmp_path / "o.pt"), *extra], capsys)
    assert (code, stdout, err.count("\n")) == (2, "", 1)
    assert err.startswith(f"emakit average: error: {message}")
    assert not (tmp_path / "o.pt").exists()


def test_missing_out_and_mismatched_models_are_refused(
    checkpoints: list[tuple[Path, dict[str, torch.Tensor]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(p) for p, _ in checkpoints]
    code, _, err = run(["average", *paths], capsys)
    assert code == 2 and err == "emakit average: error: the following arguments are required: --out\n"
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(6, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}, other)
    code, _, err = run(["average", *paths, str(other), "--out", str(tmp_path / "o.pt")], capsys)
    assert code == 2 and err == (
        f"emakit average: error: checkpoints of different models: tensor 'n' is in {paths[0]!r} but not in "
        f"{str(other)!r}\n"
    )


def test_top_level_help_lists_average(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(["--help"], capsys)
    assert code == 0 and "average" in stdout and "average the weights of several checkpoints" in stdout
    code, stdout, _ = run(["average", "--help"], capsys)
    assert code == 0 and "usage: emakit average" in stdout and "--which {training,ema}" in stdout


@pytest.mark.slow
def test_python_m_emakit_average(checkpoints: list[tuple[Path, dict[str, torch.Tensor]]], tmp_path: Path) -> None:
    """The real entry point, in a fresh interpreter."""
    out = tmp_path / "avg.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "emakit", "average", *(str(p) for p, _ in checkpoints), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    got, expected = load_file(out), naive([sd for _, sd in checkpoints], [1, 1, 1])
    assert all(torch.equal(got[n], v) for n, v in expected.items())


def test_force_never_writes_into_an_input_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``emakit average ckptA b --force --out ckptA/model.safetensors``: one line, exit 2, ckptA untouched."""

    ckpt_a = tmp_path / "ckptA"
    ckpt_a.mkdir()
    save_file({"w": torch.ones(2)}, ckpt_a / "model.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    before = (ckpt_a / "model.safetensors").read_bytes()
    out = ckpt_a / "model.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["average", str(ckpt_a), str(tmp_path / "b.safetensors"), "--force", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert f"out {str(out)!r} is inside checkpoint {str(ckpt_a)!r}, one of the inputs" in err
    assert (ckpt_a / "model.safetensors").read_bytes() == before
