"""The snapshot folder format: round trips, atomic writes, resume numbering, and folders that must be refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import emakit
from emakit.posthoc.profiles import HalfLifeProfile, PowerProfile
from emakit.posthoc.snapshots import (
    METADATA_KEY,
    SnapshotReader,
    discard_snapshots_after,
    next_snapshot_index,
    read_snapshot_index,
    write_snapshot,
)

PROFILES = [PowerProfile.from_sigma_rel(0.05), PowerProfile.from_sigma_rel(0.10)]


def averages(seed: int = 0, names: tuple[str, ...] = ("fc.weight", "fc.bias", "bn.num_batches_tracked")) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in PROFILES:
        average = {}
        for name in names:
            if name.endswith("num_batches_tracked"):
                average[name] = torch.tensor(seed + 7)
            elif name.endswith("weight"):
                average[name] = torch.randn(4, 3, generator=g)
            else:
                average[name] = torch.randn(4, generator=g)
        out.append(average)
    return out


def write_series(folder: Path, count: int, every: int = 10) -> list[list[dict]]:
    written = []
    for i in range(count):
        avgs = averages(seed=i)
        write_snapshot(
            folder,
            next_snapshot_index(folder),
            avgs,
            PROFILES,
            t=(i + 1) * every,
            step=2 * (i + 1) * every,
            update_interval=2,
        )
        written.append(avgs)
    return written


# ---------------------------------------------------------------------------------------------- round trips
def test_round_trip_metadata_and_tensors(tmp_path: Path) -> None:
    written = write_series(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"snapshot-00000{i}.safetensors" for i in range(3)]
    index = read_snapshot_index(tmp_path)
    assert [(s.index, s.t, s.step, s.update_interval) for s in index] == [
        (0, 10, 20, 2),
        (1, 20, 40, 2),
        (2, 30, 60, 2),
    ]
    assert index[0].profiles == tuple(PROFILES)
    assert index[0].tensors == {
        "fc.weight": ((4, 3), torch.float32),
        "fc.bias": ((4,), torch.float32),
        "bn.num_batches_tracked": ((), torch.int64),
    }
    meta = index[1].metadata
    assert meta["emakit_version"] == emakit.__version__ and meta["dtype"] == "float32" and meta["sharded"] is False
    assert meta["averages"][0] == {"kind": "power", "sigma_rel": pytest.approx(0.05), "gamma": PROFILES[0].gamma}
    # Any safetensors reader sees "{average}/{name}" tensors and the metadata as JSON in the header.
    loaded = load_file(tmp_path / "snapshot-000001.safetensors")
    assert set(loaded) == {f"{j}/{n}" for j in range(2) for n in written[1][0]}
    for j, average in enumerate(written[1]):
        for name, tensor in average.items():
            assert torch.equal(loaded[f"{j}/{name}"], tensor)
    with safe_open(str(tmp_path / "snapshot-000001.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["t"] == 20
    read = SnapshotReader(index[2]).read(["1/fc.weight", "0/bn.num_batches_tracked"])
    assert torch.equal(read["1/fc.weight"], written[2][1]["fc.weight"])
    assert read["0/bn.num_batches_tracked"].item() == 9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_snapshots_round_floating_tensors_only(tmp_path: Path, dtype: torch.dtype) -> None:
    avgs = averages()
    write_snapshot(tmp_path, 0, avgs, PROFILES, t=5, step=5, dtype=dtype)
    loaded = load_file(tmp_path / "snapshot-000000.safetensors")
    assert loaded["0/fc.weight"].dtype == dtype
    assert torch.equal(loaded["0/fc.weight"], avgs[0]["fc.weight"].to(dtype))
    assert loaded["0/bn.num_batches_tracked"].dtype == torch.int64
    assert read_snapshot_index(tmp_path)[0].dtype == str(dtype).removeprefix("torch.")


def test_views_into_one_flat_buffer_are_written_without_a_copy_of_the_buffer(tmp_path: Path) -> None:
    flat = torch.arange(30, dtype=torch.float32)
    views = {"a": flat[:12].view(4, 3), "b": flat[16:20]}  # an emakit FlatStorage's tensors share one buffer
    path = write_snapshot(tmp_path, 0, [views, views], PROFILES, t=1, step=1)
    loaded = load_file(path)
    assert torch.equal(loaded["1/a"], views["a"]) and torch.equal(loaded["0/b"], views["b"])
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + 2 * (12 + 4) * 4  # the views' elements, not the buffer's


def test_half_life_profiles_are_stored_too(tmp_path: Path) -> None:
    profiles: list[Any] = [HalfLifeProfile(100), {"kind": "power", "sigma_rel": 0.1}]
    write_snapshot(tmp_path, 0, averages(), profiles, t=3, step=3)
    info = read_snapshot_index(tmp_path)[0]
    assert info.profiles == (HalfLifeProfile(100), PowerProfile.from_sigma_rel(0.1))
    assert info.metadata["averages"][0] == {"kind": "half_life", "half_life_updates": 100.0}


# ---------------------------------------------------------------------------------------------- atomicity and resume
def test_a_crash_during_a_write_leaves_no_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_series(tmp_path, 2)

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError, match="disk full"):
        write_snapshot(tmp_path, 2, averages(), PROFILES, t=30, step=60)
    monkeypatch.undo()
    assert [s.index for s in read_snapshot_index(tmp_path)] == [0, 1]
    assert next_snapshot_index(tmp_path) == 2


def test_partial_temporaries_are_ignored(tmp_path: Path) -> None:
    write_series(tmp_path, 2)
    (tmp_path / ".snapshot-000002.safetensors.emakit-12-ab.tmp").write_bytes(b"\x10\x00\x00 half a header")
    (tmp_path / ".snapshot-000003.emakit-shared.tmp").mkdir()
    (tmp_path / "notes.txt").write_text("not a snapshot")
    assert [s.index for s in read_snapshot_index(tmp_path)] == [0, 1]
    assert next_snapshot_index(tmp_path) == 2


def test_next_index_continues_the_series(tmp_path: Path) -> None:
    assert next_snapshot_index(tmp_path / "missing") == 0
    assert next_snapshot_index(tmp_path) == 0
    write_series(tmp_path, 3)
    assert next_snapshot_index(tmp_path) == 3


def test_resume_from_an_earlier_checkpoint_rewrites_the_lost_future(tmp_path: Path) -> None:
    write_series(tmp_path, 5)  # t = 10 .. 50; the run resumes from a checkpoint at t = 25
    removed = discard_snapshots_after(tmp_path, 25)
    assert [p.name for p in removed] == [f"snapshot-00000{i}.safetensors" for i in (2, 3, 4)]
    assert next_snapshot_index(tmp_path) == 2
    write_snapshot(tmp_path, 2, averages(9), PROFILES, t=30, step=60, update_interval=2)
    assert [(s.index, s.t) for s in read_snapshot_index(tmp_path)] == [(0, 10), (1, 20), (2, 30)]


def test_writing_an_existing_index_needs_overwrite(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 0, averages(1), PROFILES, t=1, step=1)
    before = (tmp_path / "snapshot-000000.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"snapshot '.*snapshot-000000\.safetensors' exists; pass overwrite=True"):
        write_snapshot(tmp_path, 0, averages(2), PROFILES, t=1, step=1)
    assert (tmp_path / "snapshot-000000.safetensors").read_bytes() == before
    write_snapshot(tmp_path, 0, averages(2), PROFILES, t=1, step=1, overwrite=True)
    assert torch.equal(load_file(tmp_path / "snapshot-000000.safetensors")["0/fc.weight"], averages(2)[0]["fc.weight"])


# ---------------------------------------------------------------------------------------------- refused folders
def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"snapshot folder {str(tmp_path / 'nope')!r} does not exist")
    ):
        read_snapshot_index(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        read_snapshot_index(tmp_path / "file")
    with pytest.raises(ValueError, match=re.escape(f"snapshot folder {str(tmp_path)!r} holds no snapshots")):
        read_snapshot_index(tmp_path)


def test_mixed_profiles_are_refused_naming_the_file(tmp_path: Path) -> None:
    write_series(tmp_path, 2)
    other = [PowerProfile.from_sigma_rel(0.05), PowerProfile.from_sigma_rel(0.2)]
    write_snapshot(tmp_path, 2, averages(), other, t=30, step=60, update_interval=2)
    with pytest.raises(ValueError, match=r"snapshot-000002.safetensors' tracks averages .* but snapshot-000000"):
        read_snapshot_index(tmp_path)


def test_mixed_tensor_names_are_refused_naming_the_file_and_the_tensor(tmp_path: Path) -> None:
    write_series(tmp_path, 1)
    write_snapshot(tmp_path, 1, averages(names=("fc.weight", "head.bias")), PROFILES, t=20, step=40, update_interval=2)
    with pytest.raises(
        ValueError,
        match=r"snapshot-000001.safetensors' (has|lacks) tensor '(fc.bias|head.bias|bn.num_batches_tracked)' unlike",
    ):
        read_snapshot_index(tmp_path)


def test_mixed_shapes_and_intervals_are_refused(tmp_path: Path) -> None:
    write_series(tmp_path, 1)
    wide = [{**a, "fc.weight": torch.zeros(4, 5)} for a in averages()]
    write_snapshot(tmp_path, 1, wide, PROFILES, t=20, step=40, update_interval=2)
    with pytest.raises(ValueError, match=r"snapshot-000001.safetensors': tensor 'fc.weight' has shape \(4, 5\)"):
        read_snapshot_index(tmp_path)
    write_snapshot(tmp_path, 1, averages(), PROFILES, t=20, step=20, update_interval=1, overwrite=True)
    with pytest.raises(ValueError, match=r"snapshot-000001.safetensors' has update_interval 1, snapshot-000000"):
        read_snapshot_index(tmp_path)


def test_snapshots_that_do_not_advance_in_time_are_refused(tmp_path: Path) -> None:
    write_series(tmp_path, 2)
    write_snapshot(tmp_path, 2, averages(), PROFILES, t=15, step=30, update_interval=2)
    with pytest.raises(ValueError, match=r"snapshot-000002.safetensors' has t=15, not after snapshot-000001"):
        read_snapshot_index(tmp_path)


def test_foreign_and_corrupt_files_are_refused_naming_them(tmp_path: Path) -> None:
    write_series(tmp_path, 1)
    save_file({"w": torch.zeros(2)}, tmp_path / "snapshot-000001.safetensors")
    with pytest.raises(ValueError, match=r"snapshot-000001.safetensors' has no 'emakit.posthoc' metadata"):
        read_snapshot_index(tmp_path)
    (tmp_path / "snapshot-000001.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"snapshot-000001.safetensors' is not a readable safetensors file"):
        read_snapshot_index(tmp_path)
    (tmp_path / "snapshot-000001.safetensors").unlink()
    (tmp_path / "snapshot-000000").mkdir()
    with pytest.raises(ValueError, match=r"snapshot 0 appears twice in .*: snapshot-000000(\.safetensors)?, snapshot"):
        read_snapshot_index(tmp_path)


def test_bad_arguments_name_themselves(tmp_path: Path) -> None:
    avgs = averages()
    with pytest.raises(ValueError, match=r"profiles must have one profile per average \(2\), got 1"):
        write_snapshot(tmp_path, 0, avgs, PROFILES[:1], t=1, step=1)
    with pytest.raises(ValueError, match=r"t must be an integer >= 1, got 0"):
        write_snapshot(tmp_path, 0, avgs, PROFILES, t=0, step=1)
    with pytest.raises(ValueError, match=r"index must be an integer >= 0, got -1"):
        write_snapshot(tmp_path, -1, avgs, PROFILES, t=1, step=1)
    with pytest.raises(
        ValueError, match=r"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got torch.int8"
    ):
        write_snapshot(tmp_path, 0, avgs, PROFILES, t=1, step=1, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"averages\[1\] and averages\[0\] hold different tensor names"):
        write_snapshot(tmp_path, 0, [avgs[0], {"x": torch.zeros(1)}], PROFILES, t=1, step=1)
    with pytest.raises(ValueError, match=r"sigma_rel must be a real number in \(0, 1/sqrt\(12\)"):
        write_snapshot(tmp_path, 0, avgs, [{"kind": "power", "sigma_rel": 0.5}, PROFILES[1]], t=1, step=1)
    big = [{**a, "fc.weight": torch.full((4, 3), 1e6)} for a in avgs]
    with pytest.raises(ValueError, match=r"tensor '0/fc.weight' has values beyond the range of torch.float16"):
        write_snapshot(tmp_path, 0, big, PROFILES, t=1, step=1, dtype=torch.float16)
    assert not list(tmp_path.iterdir())


def test_edge_tensors_round_trip(tmp_path: Path) -> None:
    tensors = {
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5),
        "flags": torch.tensor([True, False]),
        "hollow": torch.zeros(2, 0, 3),
        "small_int": torch.arange(5, dtype=torch.int16),
        "half": torch.randn(3).to(torch.bfloat16),
    }
    path = write_snapshot(tmp_path, 0, [tensors, tensors], PROFILES, t=1, step=1)
    loaded = load_file(path)
    for name, tensor in tensors.items():
        expected = tensor.float() if tensor.dtype == torch.bfloat16 else tensor  # floating tensors stored in fp32
        assert torch.equal(loaded[f"1/{name}"], expected), name
    assert list(read_snapshot_index(tmp_path)[0].tensors) == list(tensors)  # the written order
