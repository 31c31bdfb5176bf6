"""``emakit demo [--posthoc] --out DIR`` where DIR cannot be created: one line and exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from emakit.cli import main


@pytest.fixture
def unwritable(tmp_path: Path) -> Path:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    return blocker / "runs" / "r"  # cannot be created: its parent's parent is a file


def test_demo_out_that_cannot_be_created(unwritable: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(unwritable), "--epochs", "1", "--no-plot"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith(f"emakit demo: error: --out: cannot create the folder {str(unwritable)!r}: "), err
    assert "Not a directory" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_posthoc_demo_out_that_cannot_be_created(
    unwritable: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    out = ["--out", str(unwritable)] if form == "separate" else [f"--out={unwritable}"]
    assert main(["demo", "--posthoc", *out, "--epochs", "1", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emakit demo --posthoc: error: --out: cannot create the folder {str(unwritable)!r}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_check_leaves_no_folder_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --epochs 0 is refused after the folder check: the folders the check made must be gone again.
    out = tmp_path / "new" / "run"
    assert main(["demo", "--posthoc", "--out", str(out), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("held", ["metrics.jsonl", "summary.json", "ema_weights.safetensors"])
def test_demo_out_that_holds_a_run_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], held: str
) -> None:
    (tmp_path / held).write_text("the user's\n")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path), "--epochs", "1", "--no-plot"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert f"--out: {str(tmp_path)!r} already holds a run ({held}); choose another or delete it" in err
    assert (tmp_path / held).read_text() == "the user's\n" and sorted(p.name for p in tmp_path.iterdir()) == [held]
