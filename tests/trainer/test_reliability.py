"""Reliability: kills at random moments, corrupt and hostile files, the non-finite guard."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TinyNet, make_loader, make_model
from emakit import EMA
from emakit.checkpoint import list_checkpoints, load_checkpoint_file
from emakit.core import Callback
from emakit.trainer import Trainer

WORKER = Path(__file__).with_name("_crash_worker.py")


def run_worker(folder: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(folder), str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_killed_at_random_moments_resumes_bitwise(tmp_path: Path) -> None:
    reference = tmp_path / "reference.pt"
    proc = run_worker(tmp_path / "uninterrupted", reference)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    folder, out = tmp_path / "killed", tmp_path / "killed.pt"
    rng = random.Random(1234)
    kills = kills_inside_writes = 0
    while kills < 20:
        proc = run_worker(folder, out, "--slow-writes")
        assert proc.stdout is not None
        line = proc.stdout.readline()  # wait until it trains (past imports and resume)
        if not line.startswith("step"):
            proc.wait(timeout=300)
            assert proc.returncode == 0 and out.exists(), proc.stderr.read() if proc.stderr else ""
            break  # it finished before we could kill it again
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        snapshots = folder / "snapshots"
        if any(p.name.endswith(".tmp") for p in folder.iterdir()) or (
            snapshots.is_dir() and any(p.name.endswith(".tmp") for p in snapshots.iterdir())
        ):
            kills_inside_writes += 1
        for path in list_checkpoints(folder)[-1:]:
            load_checkpoint_file(path)  # the newest checkpoint is always whole
    assert kills >= 20
    assert kills_inside_writes >= 1, "no kill landed inside a checkpoint or snapshot write"
    if not out.exists():
        proc = run_worker(folder, out)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    expected, got = torch.load(reference, weights_only=True), torch.load(out, weights_only=True)
    assert len(expected["snapshots"]) > 0
    for part in ("model", "ema", "snapshots"):
        assert set(got[part]) == set(expected[part])
        for name, value in expected[part].items():
            assert torch.equal(got[part][name], value), f"{part}.{name}"
    print(f"{kills} kills, {kills_inside_writes} inside checkpoint writes")


# ---------------------------------------------------------------- resuming from a folder


def save_run(folder: Path, duration: str = "1ep") -> Trainer:
    trainer = Trainer(make_model(0), make_loader(n=32), duration, algorithms=[EMA(half_life="2ba")],
                      save_folder=folder, save_interval="1ba", progress_bar=False)  # fmt: skip
    trainer.fit()
    return trainer


def test_load_latest_skips_a_truncated_newest_file(tmp_path: Path) -> None:
    save_run(tmp_path)
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "ep1-ba4.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(
        UserWarning, match=r"skipping unreadable checkpoint: checkpoint '.*ep1-ba4.pt' is truncated or damaged"
    ):
        trainer = Trainer(make_model(0), make_loader(n=32), "1ep", algorithms=[EMA(half_life="2ba")],
                          save_folder=tmp_path, load_path="latest", progress_bar=False)  # fmt: skip
    assert trainer.resumed_from is not None and trainer.resumed_from.endswith("ep0-ba3.pt")
    assert trainer.state.timestamp.batch == 3 and trainer.state.timestamp.epoch == 0


def test_autoresume_starts_fresh_then_resumes(tmp_path: Path) -> None:
    def make() -> Trainer:
        return Trainer(make_model(0), make_loader(n=32), "2ep", algorithms=[EMA(half_life="2ba")],
                       save_folder=tmp_path, autoresume=True, progress_bar=False)  # fmt: skip

    first = make()
    assert first.resumed_from is None and first.state.timestamp.batch == 0
    first.fit()
    again = make()
    assert again.resumed_from is not None and again.state.timestamp.batch == 8


def test_load_latest_with_nothing_to_load(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"load_path='latest': no readable checkpoint in"):
        Trainer(make_model(0), make_loader(), "1ep", save_folder=tmp_path, load_path="latest", progress_bar=False)


def test_stale_temporaries_are_removed_at_fit_start(tmp_path: Path) -> None:
    (tmp_path / ".ep0-ba3.pt.emakit-1234-abc123.tmp").write_bytes(b"half a checkpoint")
    save_run(tmp_path, "1ba")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ---------------------------------------------------------------- hostile and foreign files


class Payload:
    """Unpickling this runs a shell command: the attack a weights_only load must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "emakit.checkpoint", "version": 1, "state": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"checkpoint '.*evil.pt' was refused for safety: it holds objects other"):
        load_checkpoint_file(path)
    with pytest.raises(ValueError, match=r"refused for safety"):
        Trainer(make_model(0), make_loader(), "1ep", load_path=path, progress_bar=False)
    assert not marker.exists()
    assert b"system" in path.read_bytes()  # the payload is really in the file


def test_raw_pickle_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned2"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"refused for safety"):
        load_checkpoint_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a checkpoint at all", r"'.*file.pt' is truncated or damaged \(23 bytes\): torch.load failed"),
        (b"", r"'.*file.pt' is empty \(0 bytes\): torch.load failed"),
        ("json", r"is not an emakit checkpoint"),
        (
            "plain_dict",
            r"is not an emakit checkpoint \(no 'format': 'emakit.checkpoint' entry\)\. A plain state_dict saved with "
            r"torch.save loads with model.load_state_dict\(torch.load\(path, weights_only=True\)\)",
        ),
        ("future_version", r"has format version 99; this emakit reads version 1"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path: Path, content: Any, match: str) -> None:
    path = tmp_path / "file.pt"
    if content == "json":
        torch.save(["a", "list"], path)
    elif content == "plain_dict":
        torch.save({"model": {}}, path)
    elif content == "future_version":
        torch.save({"format": "emakit.checkpoint", "version": 99}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_checkpoint_file(path)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope.pt' does not exist"):
        Trainer(make_model(0), make_loader(), "1ep", load_path=tmp_path / "nope.pt", progress_bar=False)


def test_checkpoint_from_another_model_is_refused_untouched(tmp_path: Path) -> None:
    save_run(tmp_path, "2ba")
    other = TinyNet(d_in=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor 'fc1.weight' has shape \(8, 4\)"):
        Trainer(other, make_loader(), "1ep", algorithms=[EMA(half_life="2ba")], progress_bar=False,
                load_path=tmp_path / "latest.pt")  # fmt: skip
    for name, value in other.state_dict().items():
        assert torch.equal(value, before[name]), name
    smaller = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"model tensor '0.weight' is missing from the checkpoint"):
        Trainer(smaller, make_loader(), "1ep", progress_bar=False, load_path=tmp_path / "latest.pt")


def test_save_folder_that_is_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    trainer = Trainer(make_model(0), make_loader(), "1ep", save_folder=blocker / "sub", progress_bar=False)
    with pytest.raises(ValueError, match=r"save_folder '.*a_file/sub' is not a writable folder"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0  # refused before training, not at the first save
    with pytest.raises(ValueError, match=r"folder '.*a_file' exists and is not a directory"):
        Trainer(make_model(0), make_loader(), "1ep", save_folder=blocker, progress_bar=False)


def test_autoresume_needs_a_save_folder() -> None:
    with pytest.raises(ValueError, match=r"autoresume=True needs save_folder"):
        Trainer(make_model(0), make_loader(), "1ep", autoresume=True, progress_bar=False)
    with pytest.raises(ValueError, match=r"load_path='latest' needs save_folder"):
        Trainer(make_model(0), make_loader(), "1ep", load_path="latest", progress_bar=False)
    with pytest.raises(TypeError, match=r"autoresume must be a bool, got 'yes'"):
        Trainer(make_model(0), make_loader(), "1ep", autoresume="yes", progress_bar=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"load_path must be a path or 'latest', got 3"):
        Trainer(make_model(0), make_loader(), "1ep", load_path=3, progress_bar=False)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the non-finite guard


class PoisonOnce(Callback):
    """Puts a NaN into the weights before batch ``at`` and the saved weights back before the next one."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.saved: dict[str, torch.Tensor] | None = None

    def batch_start(self, state: Any, logger: Any) -> None:
        batch = state.timestamp.batch + 1
        model = state.model
        if batch == self.at:
            self.saved = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():
                model.fc2.bias[0] = float("nan")
        elif batch == self.at + 1 and self.saved is not None:
            model.load_state_dict(self.saved)


def test_skip_nonfinite_protects_the_average() -> None:
    def run(skip: bool) -> tuple[Trainer, EMA]:
        ema = EMA(half_life="2ba", skip_nonfinite=skip)
        trainer = Trainer(make_model(0), make_loader(n=48), "1ep", algorithms=[ema], callbacks=[PoisonOnce(3)],
                          progress_bar=False)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit()
        return trainer, ema

    _, unguarded = run(False)
    assert not torch.isfinite(unguarded.ema_tensors["fc2.bias"]).all()

    with pytest.warns(UserWarning, match=r"EMA update at batch 3 skipped: the training weights contain NaN or Inf"):
        ema = EMA(half_life="2ba", skip_nonfinite=True)
        Trainer(make_model(0), make_loader(n=48), "1ep", algorithms=[ema], callbacks=[PoisonOnce(3)],
                progress_bar=False).fit()  # fmt: skip
    assert ema.num_skipped_nonfinite == 1
    assert (ema.n_averaged - 1) == 4  # batches 2, 4, 5, 6 blended; 3 skipped
    for name, value in ema.ema_tensors.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    assert ema.state_dict()["num_skipped_nonfinite"] == 1


def test_skip_nonfinite_off_costs_nothing_and_changes_nothing() -> None:
    def run(skip: bool) -> EMA:
        ema = EMA(half_life="2ba", skip_nonfinite=skip)
        Trainer(make_model(0), make_loader(n=32), "1ep", algorithms=[ema], progress_bar=False).fit()
        return ema

    guarded, plain = run(True), run(False)
    assert guarded.num_skipped_nonfinite == 0
    for name, value in plain.ema_tensors.items():
        assert torch.equal(guarded.ema_tensors[name], value), name


def test_skip_nonfinite_on_a_flattened_model_reads_the_flat_buffers() -> None:
    ema = EMA(half_life="2ba", skip_nonfinite=True, flatten_model=True)
    trainer = Trainer(make_model(0), make_loader(n=48), "1ep", algorithms=[ema], callbacks=[PoisonOnce(3)],
                      progress_bar=False)  # fmt: skip
    with pytest.warns(UserWarning, match=r"EMA update at batch 3 skipped"):
        trainer.fit()
    assert ema.storage is not None and ema.storage.current_flat_sources()  # the fast check was available
    assert ema.num_skipped_nonfinite == 1 and (ema.n_averaged - 1) == 4
    assert all(torch.isfinite(v).all() for v in ema.ema_tensors.values() if v.is_floating_point())


def test_a_truncated_checkpoint_names_its_size_and_the_intact_previous_one(tmp_path: Path) -> None:
    Trainer(make_model(0), make_loader(), "2ep", save_folder=tmp_path, progress_bar=False).fit()
    newest = tmp_path / "ep2-ba16.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    size = f"{len(data) // 2:,}"
    with pytest.raises(
        ValueError,
        match=rf"'.*ep2-ba16.pt' is truncated or damaged \({size} bytes\).*previous checkpoint in the folder, 'ep1-ba8.pt', reads back whole",
    ) as info:
        load_checkpoint_file(newest)
    assert "safe" not in str(info.value)  # damage is not a security refusal
    (tmp_path / "ep1-ba8.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is truncated or damaged") as info:
        load_checkpoint_file(newest)
    assert "previous checkpoint" not in str(info.value)
