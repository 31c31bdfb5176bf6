"""Nothing emakit writes replaces, shadows or leaves stale a file the user did not say to overwrite.

The writers checked: ``export_ema_weights`` (one file, ``.pt``, Transformers' sharded layout), ``average_checkpoints``,
the Trainer's checkpoints, and :mod:`emakit.atomic` under them all (permissions from the umask, no replace without
``overwrite``, errors naming the user's path).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_loader, make_model
from emakit import EMA
from emakit.atomic import atomic_file, install, temporary_path, write_bytes
from emakit.callbacks.checkpoint_saver import CheckpointSaver
from emakit.checkpoint import average_checkpoints, list_checkpoints, load_checkpoint_file
from emakit.checkpoint.export import export_ema_weights
from emakit.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """A short run with an EMA whose checkpoints sit in its save_folder."""
    folder = tmp_path_factory.mktemp("run")
    trainer = Trainer(make_model(0), make_loader(n=32), "1ep", algorithms=[EMA(half_life="2ba")],
                      save_folder=folder / "ckpt", save_interval="2ba", progress_bar=False)  # fmt: skip
    trainer.fit()
    return trainer


def checkpoint_of(run: Trainer) -> Path:
    """The newest checkpoint the run's CheckpointSaver wrote."""
    saver = next(c for c in run.state.callbacks if isinstance(c, CheckpointSaver))
    return list_checkpoints(saver.folder)[-1]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------ the atomic writer
def test_files_get_the_permissions_the_umask_gives(tmp_path: Path, umask_022: None, run: Trainer) -> None:
    torch.save({}, tmp_path / "reference.pt")
    expected = mode(tmp_path / "reference.pt")
    assert expected == 0o644
    assert mode(write_bytes(tmp_path / "a.bin", b"x", overwrite=False)) == expected
    assert mode(checkpoint_of(run)) == expected  # written by the Trainer's CheckpointSaver
    for name in ("ema.safetensors", "ema.pt"):
        assert mode(export_ema_weights(run, tmp_path / name)) == expected  # type: ignore[arg-type]
    shards = export_ema_weights(run, tmp_path / "sharded", max_shard_size=64)
    assert shards is not None and {mode(p) for p in shards.iterdir()} == {expected}
    paths = [tmp_path / "ema.safetensors", tmp_path / "ema.safetensors.copy.safetensors"]
    paths[1].write_bytes(paths[0].read_bytes())
    assert mode(average_checkpoints(paths, tmp_path / "avg.safetensors").path) == expected
    assert mode(average_checkpoints(paths, tmp_path / "avg.pt").path) == expected
    os.umask(0o077)
    assert mode(write_bytes(tmp_path / "private.bin", b"x", overwrite=False)) == 0o600


def test_the_writer_never_replaces_a_file_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"the user's")
    with pytest.raises(FileExistsError, match=r"path '.*f\.bin' exists; pass overwrite=True to replace it"):
        write_bytes(target, b"mine", overwrite=False)
    assert target.read_bytes() == b"the user's"
    # a file that appears between the check and the rename (another process) is not replaced either
    tmp = temporary_path(target)
    tmp.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"exists"):
        install(tmp, target, overwrite=False)
    assert target.read_bytes() == b"the user's"
    tmp.unlink()
    write_bytes(target, b"mine", overwrite=True)
    assert target.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_failed_write_leaves_no_temporary_and_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_file(target, overwrite=True) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ------------------------------------------------------------------------------------ export (items 1, 2, 17)
def test_export_refuses_its_own_source_checkpoint(tmp_path: Path, run: Trainer) -> None:
    source = tmp_path / "ckpt.pt"
    source.write_bytes(checkpoint_of(run).read_bytes())
    before = source.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(source)
    for target in (source, link, tmp_path / "." / "ckpt.pt"):
        with pytest.raises(ValueError, match=r"path '.*' is the checkpoint being exported \(source '.*ckpt\.pt'\)"):
            export_ema_weights(source, target, overwrite=True)
    with pytest.raises(ValueError, match=r"is the checkpoint being exported"):
        export_ema_weights(link, source, overwrite=True)
    assert source.read_bytes() == before
    load_checkpoint_file(source)


def test_export_refuses_an_existing_file_unless_overwrite(tmp_path: Path, run: Trainer) -> None:
    for name in ("ema.safetensors", "ema.pt"):
        target = tmp_path / name
        target.write_bytes(b"the user's weights")
        with pytest.raises(FileExistsError, match=rf"path '.*{name}' exists; pass overwrite=True to replace it"):
            export_ema_weights(run, target)
        assert target.read_bytes() == b"the user's weights"
        export_ema_weights(run, target, overwrite=True)
        assert target.read_bytes() != b"the user's weights"


def test_export_output_paths_that_cannot_work_are_named(tmp_path: Path, run: Trainer) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    with pytest.raises(ValueError, match=r"path '.*afile/ema\.safetensors' cannot be written: '.*afile' is a file"):
        export_ema_weights(run, afile / "ema.safetensors")
    with pytest.raises(ValueError, match=r"max_shard_size=64 writes a folder.* path '.*x\.safetensors' names a file"):
        export_ema_weights(run, tmp_path / "x.safetensors", max_shard_size=64)
    assert not (tmp_path / "x.safetensors").exists()
    if os.getuid() != 0:
        with pytest.raises(OSError, match=r"cannot write path '/proc/emakit-test/ema\.safetensors'"):
            export_ema_weights(run, Path("/proc/emakit-test/ema.safetensors"))


def _layout(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_sharded_export_never_sits_beside_a_stale_model_file(tmp_path: Path, run: Trainer) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    stale = {"w": torch.zeros(2)}
    save_file(stale, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"'.*hf' holds model\.safetensors .*overwrite=True"):
        export_ema_weights(run, folder, max_shard_size=64)
    assert _layout(folder) == ["config.json", "model.safetensors"]
    export_ema_weights(run, folder, max_shard_size=64, overwrite=True)
    files = _layout(folder)
    assert "model.safetensors" not in files and "config.json" in files and "model.safetensors.index.json" in files
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) | {"config.json", "model.safetensors.index.json"} == set(files)


def test_a_single_file_export_never_sits_beside_a_stale_index(tmp_path: Path, run: Trainer) -> None:
    folder = tmp_path / "hf"
    export_ema_weights(run, folder, max_shard_size=64)
    sharded = _layout(folder)
    assert "model.safetensors.index.json" in sharded and len(sharded) > 2
    with pytest.raises(FileExistsError, match=r"holds model\.safetensors\.index\.json, model-00001-of-"):
        export_ema_weights(run, folder, max_shard_size=10**9)
    with pytest.raises(FileExistsError, match=r"holds model\.safetensors\.index\.json"):
        export_ema_weights(run, folder / "model.safetensors")
    assert _layout(folder) == sharded
    export_ema_weights(run, folder, max_shard_size=10**9, overwrite=True)
    assert _layout(folder) == ["model.safetensors"]
    expected = load_file(export_ema_weights(run, tmp_path / "one.safetensors"))  # type: ignore[arg-type]
    got = load_file(folder / "model.safetensors")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


# ------------------------------------------------------------------------------------ average (items 6, 17)
def _two_inputs(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(2):
        path = tmp_path / f"c{i}.safetensors"
        save_file({"w": torch.full((3,), float(i))}, path)
        paths.append(path)
    return paths


def test_average_refuses_an_output_inside_an_input_folder(tmp_path: Path) -> None:
    ckpt_a = tmp_path / "ckptA"
    ckpt_a.mkdir()
    save_file({"w": torch.ones(3)}, ckpt_a / "model.safetensors")
    other = _two_inputs(tmp_path)[0]
    before = (ckpt_a / "model.safetensors").read_bytes()
    for out in (ckpt_a / "model.safetensors", ckpt_a / "avg.safetensors"):
        with pytest.raises(ValueError, match=r"out '.*ckptA/.*' is inside checkpoint '.*ckptA', one of the inputs"):
            average_checkpoints([ckpt_a, other], out, force=True)
    assert (ckpt_a / "model.safetensors").read_bytes() == before and _layout(ckpt_a) == ["model.safetensors"]


def test_average_refuses_the_same_checkpoint_twice(tmp_path: Path) -> None:
    paths = _two_inputs(tmp_path)
    link = tmp_path / "link.safetensors"
    link.symlink_to(paths[0])
    for twice in ([paths[0], paths[1], paths[0]], [paths[0], link, paths[1]]):
        with pytest.raises(ValueError, match=r"paths: checkpoints 1 and 2|paths: checkpoints 1 and 3"):
            average_checkpoints(twice, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_average_refuses_one_path_given_as_a_string(tmp_path: Path) -> None:
    path = _two_inputs(tmp_path)[0]
    for one in (str(path), path):
        with pytest.raises(TypeError, match=r"paths must be a list of checkpoint paths, got a single path"):
            average_checkpoints(one, tmp_path / "out.safetensors")  # type: ignore[arg-type]


def test_average_output_under_a_file_or_proc_is_named(tmp_path: Path) -> None:
    paths = _two_inputs(tmp_path)
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    with pytest.raises(ValueError, match=r"out '.*afile/avg\.safetensors' cannot be written: '.*afile' is a file"):
        average_checkpoints(paths, afile / "avg.safetensors")
    if os.getuid() != 0:
        with pytest.raises(OSError, match=r"cannot write out '/proc/emakit-test/avg\.safetensors'"):
            average_checkpoints(paths, "/proc/emakit-test/avg.safetensors")


def test_integer_tensors_come_from_the_last_checkpoint_with_a_nonzero_weight(tmp_path: Path) -> None:
    inputs = [
        {"x": torch.full((3,), float(i)), "step": torch.tensor([i, 10 * i]), "on": torch.tensor(i == 1)}
        for i in range(3)
    ]
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for sd, path in zip(inputs, paths, strict=True):
        save_file(sd, path)
    got = load_file(average_checkpoints(paths, tmp_path / "o.safetensors", weights=[1, 1, 0]).path)
    assert got["x"].tolist() == [0.5] * 3  # closed form: (0 + 1) / 2
    assert got["step"].tolist() == [1, 10] and got["on"].item() is True  # checkpoint 2 (weight 0) is left out
    got = load_file(average_checkpoints(paths, tmp_path / "p.safetensors", weights=[0, 1, 3]).path)
    assert got["step"].tolist() == [2, 20] and got["on"].item() is False
