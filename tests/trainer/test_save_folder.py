"""A fresh run never writes over another run's checkpoints in its save_folder, and keeps files it did not write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import make_loader, make_model
from emakit import EMA
from emakit.checkpoint import list_checkpoints
from emakit.trainer import Trainer


def make(folder: Path, duration: str = "1ep", **kwargs: object) -> Trainer:
    return Trainer(make_model(0), make_loader(n=32), duration, algorithms=[EMA(half_life="2ba")],
                   save_folder=folder, save_interval="2ba", progress_bar=False, **kwargs)  # type: ignore[arg-type]  # fmt: skip


def contents(folder: Path) -> dict[str, bytes | str]:
    return {
        p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path: Path) -> None:
    make(tmp_path, "2ep").fit()
    before = contents(tmp_path)
    assert "ep2-ba8.pt" in before and "latest.pt" in before
    second = make(tmp_path)
    with pytest.raises(FileExistsError, match=r"save_folder '.*' holds checkpoints of another run \(ep0-ba2\.pt, "
                       r".*ep2-ba8\.pt\).*save_overwrite=True.*autoresume=True"):  # fmt: skip
        second.fit()
    assert contents(tmp_path) == before


def test_save_overwrite_replaces_the_other_runs_checkpoints(tmp_path: Path) -> None:
    make(tmp_path, "2ep").fit()
    with pytest.warns(UserWarning, match=r"save_overwrite=True: removed 4 checkpoint\(s\) of an earlier run"):
        make(tmp_path, save_overwrite=True).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ep0-ba2.pt", "ep1-ba4.pt"]
    assert os.readlink(tmp_path / "latest.pt") == "ep1-ba4.pt"


def test_a_resumed_run_continues_in_its_folder(tmp_path: Path) -> None:
    make(tmp_path, "1ep").fit()
    resumed = make(tmp_path, "2ep", autoresume=True)
    assert resumed.state.timestamp.batch == 4
    resumed.fit()
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "ep2-ba8.pt"


def test_only_emakits_own_temporaries_are_removed(tmp_path: Path) -> None:
    make(tmp_path, "1ep").fit()
    ours = tmp_path / ".ep1-ba6.pt.emakit-12345-abc123.tmp"
    ours.write_bytes(b"half a checkpoint")
    users = [
        tmp_path / ".notes.tmp",
        tmp_path / ".ep1-ba6.pt.abc123.tmp",
        tmp_path / ".model.safetensors.emakit-1-ab.tmp",
    ]
    for path in users:
        path.write_bytes(b"the user's")
    make(tmp_path, "2ep", autoresume=True).fit()
    assert not ours.exists()
    assert all(path.read_bytes() == b"the user's" for path in users)
