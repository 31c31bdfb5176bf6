"""Checkpoint averaging equals a naive average (everything loaded, averaged in float64) for every format it reads.

The expectations come from elsewhere: weights recorded from a live emakit run at the moments it saved, Lightning
and Transformers files loaded whole by their own loaders, and a loop over fully loaded state_dicts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import make_loader, make_model
from emakit import EMA
from emakit.checkpoint import (
    AveragedCheckpoint,
    average_checkpoints,
    build_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from emakit.checkpoint.average import normalize_weights
from emakit.checkpoint.weight_readers import Piece, open_weights
from emakit.core import Callback
from emakit.trainer import Trainer

Weights = dict[str, torch.Tensor]


def naive_average(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Weights:
    """Everything in memory: sum(w * x) in float64 per floating tensor, in its dtype; others from the last."""
    out: Weights = {}
    for name, last in state_dicts[-1].items():
        if last.is_floating_point():
            total = sum(w * sd[name].double() for w, sd in zip(weights, state_dicts, strict=True))
            assert isinstance(total, torch.Tensor)
            out[name] = total.to(last.dtype)
        else:
            out[name] = last.clone()
    return out


def read_output(path: Path) -> Weights:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def assert_same(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert list(got) == list(expected) or set(got) == set(expected), (sorted(got), sorted(expected))
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name


def average_and_check(
    paths: Sequence[Path], expected_inputs: Sequence[Mapping[str, torch.Tensor]], out: Path, **kwargs: Any
) -> AveragedCheckpoint:
    result = average_checkpoints(paths, out, **kwargs)
    raw = kwargs.get("weights") or [1.0] * len(paths)
    assert result.weights == pytest.approx([w / sum(raw) for w in raw], rel=1e-12)
    assert_same(read_output(out), naive_average(expected_inputs, result.weights))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    return result


def random_state_dict(seed: int, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Weights:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (12, 5), "b": (5,)}
    sd: Weights = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    sd["half"] = torch.randn(3, 4, generator=g).half()
    sd["bf16"] = torch.randn(7, generator=g).bfloat16()
    sd["double"] = torch.randn(2, 2, generator=g, dtype=torch.float64)
    sd["scalar"] = torch.randn((), generator=g)
    sd["count"] = torch.tensor(100 + seed)
    sd["mask"] = torch.rand(6, generator=g) > 0.5
    return sd


# ------------------------------------------------------------------------------------------ emakit checkpoints
class SaveEverywhere(Callback):
    """At every 2nd batch: records the training and EMA weights, and writes the run's state in four forms."""

    def __init__(self, folder: Path, ema: EMA) -> None:
        self.folder, self.ema = folder, ema
        self.training: list[Weights] = []
        self.averaged: list[Weights] = []

    def batch_end(self, state: Any, logger: Any) -> None:
        b = state.timestamp.batch
        if b % 2:
            return
        self.training.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})
        self.averaged.append({k: v.detach().clone() for k, v in self.ema.ema_model.state_dict().items()})
        save_checkpoint(state, self.folder / f"published-{b}.pt", publish=True)
        save_checkpoint(state, self.folder / f"training-{b}.pt", publish=False)
        save_sharded_checkpoint(build_sharded_checkpoint(state, publish=True), self.folder / f"published-dcp-{b}")
        save_sharded_checkpoint(build_sharded_checkpoint(state, publish=False), self.folder / f"training-dcp-{b}")


@pytest.fixture(scope="module")
def emakit_run(tmp_path_factory: pytest.TempPathFactory) -> SaveEverywhere:
    folder = tmp_path_factory.mktemp("emakit_checkpoints")
    ema = EMA(half_life="3ba")
    saver = SaveEverywhere(folder, ema)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    trainer = Trainer(
        model, make_loader(n=64), "8ba", algorithms=[ema], optimizers=optimizer, callbacks=[saver], progress_bar=False
    )
    trainer.fit()
    assert len(saver.training) == 4
    return saver


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("form", ["published", "training", "published-dcp", "training-dcp"])
@pytest.mark.parametrize("which", ["training", "ema"])
@pytest.mark.parametrize("weights", [None, [1.0, 0.0, 2.5, 4.0]])
def test_emakit_checkpoints_average_the_weights_the_run_had(
    emakit_run: SaveEverywhere, tmp_path: Path, form: str, which: str, weights: list[float] | None
) -> None:
    paths = [emakit_run.folder / f"{form}-{b}{'' if 'dcp' in form else '.pt'}" for b in (2, 4, 6, 8)]
    recorded = emakit_run.training if which == "training" else emakit_run.averaged
    assert "bn.num_batches_tracked" in recorded[0] and not torch.equal(
        recorded[0]["fc1.weight"], recorded[-1]["fc1.weight"]
    )
    out = tmp_path / ("avg.safetensors" if weights else "avg.pt")
    chunk_bytes = 256 if weights else 2**26  # tiny groups: rows split, except for DCP inputs (whole tensors)
    result = average_and_check(paths, recorded, out, weights=weights, which=which, chunk_bytes=chunk_bytes)
    assert (result.averaged, result.copied) == (len(recorded[0]) - 1, 1)  # num_batches_tracked, from the last
    assert read_output(out)["bn.num_batches_tracked"].item() == 8
    model = make_model()
    model.load_state_dict(read_output(out))  # a plain state_dict of the model


def test_emakit_checkpoint_without_an_ema_has_no_ema_weights(tmp_path: Path) -> None:
    trainer = Trainer(make_model(), make_loader(), "2ba", progress_bar=False)
    trainer.fit()
    path = trainer.save_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt' holds no EMA weights"):
        average_checkpoints([path], tmp_path / "x.pt", which="ema")
    result = average_checkpoints([path], tmp_path / "x.pt")  # one checkpoint: its training weights
    assert_same(read_output(result.path), {k: v for k, v in trainer.state.model.state_dict().items()})


def test_fp32_average_of_a_bf16_model_is_averaged_in_full_and_written_in_bf16(tmp_path: Path) -> None:
    """A training checkpoint keeps a low-precision model's EMA in fp32: that is what gets averaged."""
    paths, masters, models = [], [], []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        model = {"w": torch.randn(4, 8, generator=g).bfloat16(), "n": torch.tensor(i)}
        master = {"w": torch.randn(4, 8, generator=g)}
        checkpoint = {
            "format": "emakit.checkpoint",
            "version": 1,
            "model_weights": "training",
            "state": {"model": model, "algorithms": {"EMA": {"started": True, "ema": master}}},
        }
        paths.append(tmp_path / f"{i}.pt")
        torch.save(checkpoint, paths[-1])
        masters.append({**model, **master})
        models.append(model)
    result = average_checkpoints(paths, tmp_path / "ema.safetensors", which="ema", weights=[1, 2, 3])
    expected = naive_average(masters, result.weights)
    got = read_output(result.path)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], expected["w"].bfloat16())
    assert got["n"].item() == 2
    training = read_output(average_checkpoints(paths, tmp_path / "t.pt", weights=[1, 2, 3]).path)
    assert_same(training, naive_average(models, result.weights))


# ------------------------------------------------------------------------------------------ plain files
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("out_suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("weights", [None, [3.0, 1.0, 0.5]])
def test_state_dict_files_average_like_the_naive_loop(
    tmp_path: Path, suffix: str, out_suffix: str, weights: list[float] | None
) -> None:
    inputs = [random_state_dict(seed) for seed in range(3)]
    paths = []
    for i, sd in enumerate(inputs):
        paths.append(tmp_path / f"in{i}{suffix}")
        save_file(sd, paths[-1]) if suffix == ".safetensors" else torch.save(sd, paths[-1])
    result = average_and_check(paths, inputs, tmp_path / f"out{out_suffix}", weights=weights)
    assert result.copied == 2 and result.averaged == len(inputs[0]) - 2
    assert result.nbytes == sum(t.numel() * t.element_size() for t in inputs[0].values())
    assert read_output(result.path)["count"].item() == 102  # from the last, whatever its weight


def test_large_tensors_split_by_rows_give_the_same_bits(tmp_path: Path) -> None:
    inputs = [random_state_dict(seed, {"big": (301, 17), "wide": (2, 999), "b": (5,)}) for seed in range(4)]
    paths = [tmp_path / f"in{i}.safetensors" for i in range(4)]
    for sd, path in zip(inputs, paths, strict=True):
        save_file(sd, path)
    for chunk_bytes in (1, 64, 1000, 10**9):  # from one row per group to everything at once
        for suffix in (".safetensors", ".pt"):
            out = tmp_path / f"out{chunk_bytes}{suffix}"
            average_and_check(paths, inputs, out, weights=[1, 2, 3, 4], chunk_bytes=chunk_bytes)


def test_lightning_checkpoints(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from emakit.integrations.lightning import EMACallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    saver = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{step}", save_top_k=-1, every_n_train_steps=2)
    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[EMACallback(half_life="2ba"), saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(Net(), make_loader())
    paths = [tmp_path / "ck" / f"step={s}.ckpt" for s in (2, 4, 6)]
    loaded = [torch.load(p, weights_only=False) for p in paths]
    for which, key in (("ema", "state_dict"), ("training", "training_state_dict")):
        average_and_check(paths, [c[key] for c in loaded], tmp_path / f"{which}.pt", which=which, weights=[1, 2, 3])
    back = Net()
    back.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))  # Lightning's own key names

    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": loaded[0]["training_state_dict"], "epoch": 0}, plain)
    with pytest.raises(ValueError, match=r"plain\.ckpt' holds no EMA weights: it has no 'training_state_dict'"):
        average_checkpoints([plain, paths[0]], tmp_path / "x.pt", which="ema")


def test_transformers_folders_sharded_single_and_bin(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=32, n_layer=2, n_head=2)
    folders, models = [], []
    for i in range(3):
        torch.manual_seed(i)
        model = transformers.GPT2LMHeadModel(config).to(torch.bfloat16)
        models.append(model)
        folders.append(tmp_path / f"sharded-{i}")
        model.save_pretrained(folders[-1], max_shard_size="40KB")
    assert (folders[0] / "model.safetensors.index.json").is_file()
    assert len(list(folders[0].glob("model-*-of-*.safetensors"))) > 1
    stored = [open_weights(f).tensors for f in folders]
    in_files = [{n: m.state_dict()[n] for n in s} for m, s in zip(models, stored, strict=True)]
    assert "lm_head.weight" not in stored[0]  # tied to the embedding: saved once
    result = average_and_check(folders, in_files, tmp_path / "avg.safetensors", weights=[1, 1, 2])
    averaged = transformers.GPT2LMHeadModel(config).to(torch.bfloat16)
    missing, unexpected = averaged.load_state_dict(load_file(result.path), strict=False)
    assert not unexpected and all("lm_head" in n or "attn.bias" in n for n in missing)

    single = tmp_path / "single"
    models[0].save_pretrained(single)  # one model.safetensors
    torch.save({k: v.clone() for k, v in models[1].state_dict().items() if k in stored[0]}, tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    os.replace(tmp_path / "bin.pt", tmp_path / "bin" / "pytorch_model.bin")
    average_and_check([single, tmp_path / "bin"], in_files[:2], tmp_path / "mixed.pt")

    with pytest.raises(ValueError, match=r"holds no EMA weights: no ema_weights\.safetensors"):
        average_checkpoints([single], tmp_path / "e.pt", which="ema")
    emas = [random_state_dict(s) for s in (5, 6)]
    for folder, sd in zip(folders[:2], emas, strict=True):
        save_file(sd, folder / "ema_weights.safetensors")  # what emakit's Transformers callback writes
    average_and_check(folders[:2], emas, tmp_path / "ema.safetensors", which="ema")


# ------------------------------------------------------------------------------------------ refusals
def write_all(tmp_path: Path, state_dicts: Sequence[Weights]) -> list[Path]:
    paths = [tmp_path / f"c{i}.safetensors" for i in range(len(state_dicts))]
    for sd, path in zip(state_dicts, paths, strict=True):
        save_file(sd, path)
    return paths


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sd: sd.pop("b"), r"tensor 'b' is in '.*c0\.safetensors' but not in '.*c2\.safetensors'"),
        (lambda sd: sd.update(extra=torch.zeros(1)), r"tensor 'extra' is in '.*c2\.safetensors' but not in '.*c0"),
        (
            lambda sd: sd.update(w=torch.zeros(5, 12)),
            r"tensor 'w' has shape \(12, 5\) float32 in '.*c0\.safetensors' "
            r"but shape \(5, 12\) float32 in '.*c2\.safetensors'",
        ),
        (lambda sd: sd.update(half=sd["half"].float()), r"tensor 'half' has shape \(3, 4\) float16 .* float32 in"),
    ],
)
def test_checkpoints_of_different_models_are_refused_naming_the_tensor(
    tmp_path: Path, change: Any, message: str
) -> None:
    inputs = [random_state_dict(seed) for seed in range(3)]
    change(inputs[2])
    paths = write_all(tmp_path, inputs)
    with pytest.raises(ValueError, match="checkpoints of different models: " + message):
        average_checkpoints(paths, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.safetensors", "c1.safetensors", "c2.safetensors"]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], r"weights: got 1 weights \[1.0\] for 2 checkpoints; give one per checkpoint"),
        ([1.0, 2.0, 3.0], r"got 3 weights"),
        ([1.0, -0.5], r"weights: weight 2 is -0.5; weights must be finite numbers >= 0"),
        ([float("nan"), 1.0], r"weight 1 is nan"),
        ([float("inf"), 1.0], r"weight 1 is inf"),
        ([0, 0.0], r"weights: all 2 weights are 0; at least one must be positive"),
        (["1", 2], r"weight 1 is '1'"),
    ],
)
def test_bad_weights_are_refused(tmp_path: Path, weights: list[Any], message: str) -> None:
    paths = write_all(tmp_path, [random_state_dict(0), random_state_dict(1)])
    with pytest.raises(ValueError, match=message):
        average_checkpoints(paths, tmp_path / "out.pt", weights=weights)
    assert not (tmp_path / "out.pt").exists()


def test_bad_arguments_and_files_are_refused(tmp_path: Path) -> None:
    paths = write_all(tmp_path, [random_state_dict(0), random_state_dict(1)])
    with pytest.raises(ValueError, match=r"out must end in \.safetensors, \.pt, \.pth, \.bin .* got '.*out\.txt'"):
        average_checkpoints(paths, tmp_path / "out.txt")
    with pytest.raises(ValueError, match=r"which must be 'training' or 'ema', got 'raw'"):
        average_checkpoints(paths, tmp_path / "out.pt", which="raw")
    with pytest.raises(ValueError, match=r"is one of the checkpoints being averaged"):
        average_checkpoints(paths, paths[1], force=True)
    with pytest.raises(ValueError, match=r"need at least one checkpoint"):
        average_checkpoints([], tmp_path / "out.pt")
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope\.pt' does not exist"):
        average_checkpoints([paths[0], tmp_path / "nope.pt"], tmp_path / "out.pt")
    torch.save({"epoch": 3, "notes": "hi"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds a dict with keys \['epoch', 'notes'\]: expected an emakit checkpoint"):
        average_checkpoints([paths[0], tmp_path / "other.pt"], tmp_path / "out.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"neither an emakit DCP checkpoint .* nor a Transformers checkpoint"):
        average_checkpoints([tmp_path / "folder"], tmp_path / "out.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors' is not a readable safetensors file"):
        average_checkpoints([tmp_path / "junk.safetensors"], tmp_path / "out.pt")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".*tmp"))


def test_an_existing_output_is_refused_or_kept_aside_with_force(tmp_path: Path) -> None:
    inputs = [random_state_dict(0), random_state_dict(1)]
    paths = write_all(tmp_path, inputs)
    out = tmp_path / "avg.pt"
    out.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match=r"out '.*avg\.pt' exists; pass force=True \(--force\)"):
        average_checkpoints(paths, out)
    assert out.read_bytes() == b"the user's file"
    first = average_and_check(paths, inputs, out, force=True)
    assert first.moved_aside == tmp_path / "avg.pt.old" and first.moved_aside.read_bytes() == b"the user's file"
    second = average_checkpoints(paths, out, force=True, weights=[0, 1])
    assert second.moved_aside == tmp_path / "avg.pt.old2"
    assert_same(read_output(second.moved_aside), naive_average(inputs, first.weights))
    assert_same(read_output(out), naive_average(inputs, [0.0, 1.0]))


def test_a_failure_while_averaging_leaves_the_old_output_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_all(tmp_path, [random_state_dict(0), random_state_dict(1)])
    out = tmp_path / "avg.safetensors"
    out.write_bytes(b"old")
    import emakit.checkpoint.average as average

    def broken(*args: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(average, "_average_group", broken)
    with pytest.raises(OSError, match="disk on fire"):
        average_checkpoints(paths, out, force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.safetensors", "c0.safetensors", "c1.safetensors"]


# ------------------------------------------------------------------------------------------ weights
finite_weights = st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False)


@given(st.lists(finite_weights, min_size=1, max_size=12).filter(lambda ws: any(w > 0 for w in ws)))
def test_normalised_weights_sum_to_one_and_keep_their_ratios(weights: list[float]) -> None:
    got = normalize_weights(weights, len(weights))
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-12)
    assert all(0.0 <= g <= 1.0 for g in got)
    largest = max(weights)
    for w, g in zip(weights, got, strict=True):
        assert (g == 0) == (w == 0) or w / largest < 1e-300  # zero stays zero; only a vanishing ratio underflows
        assert g == pytest.approx((w / largest) / math.fsum(x / largest for x in weights), rel=1e-12, abs=1e-300)


@given(
    st.lists(finite_weights, min_size=1, max_size=8).filter(lambda ws: any(w > 0 for w in ws)),
    st.floats(min_value=1e-100, max_value=1e100),
)
def test_normalised_weights_do_not_depend_on_scale(weights: list[float], scale: float) -> None:
    scaled = [w * scale for w in weights]
    assume(all(math.isfinite(x) and (x > 1e-290 or w == 0) for w, x in zip(weights, scaled, strict=True)))
    assert normalize_weights(scaled, len(weights)) == pytest.approx(
        normalize_weights(weights, len(weights)), rel=1e-9, abs=1e-290
    )


@given(st.integers(min_value=1, max_value=50))
def test_no_weights_means_the_plain_mean(count: int) -> None:
    assert normalize_weights(None, count) == [1.0 / count] * count


@given(st.lists(st.one_of(finite_weights, st.floats(max_value=-1e-300), st.just(float("nan"))), min_size=1, max_size=6))
def test_weights_are_accepted_exactly_when_valid(weights: list[float]) -> None:
    valid = all(math.isfinite(w) and w >= 0 for w in weights) and any(w > 0 for w in weights)
    if valid:
        assert len(normalize_weights(weights, len(weights))) == len(weights)
    else:
        with pytest.raises(ValueError, match=r"^weights: "):
            normalize_weights(weights, len(weights))


# ------------------------------------------------------------------------------------------ memory-mapped reads
def test_pages_handed_back_after_a_group_read_back_the_same_values(tmp_path: Path) -> None:
    """``done()`` drops the mapped pages; reading again re-reads them from the file, tied tensors included."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(64, 1024, generator=g)
    sd = {"tied.a": shared, "tied.b": shared, "t": torch.randn(1024, 3, generator=g).t(), "n": torch.tensor(5)}
    torch.save(sd, tmp_path / "m.pt")
    reader = open_weights(tmp_path / "m.pt")
    for _ in range(3):
        for piece in [Piece("tied.a"), Piece("tied.b", 10, 20), Piece("t"), Piece("n")]:
            got = reader.read([piece])[piece].clone()
            reader.done()
            assert torch.equal(got, piece.of(sd[piece.name])), piece
    inputs = [sd, {k: v * 2 if v.is_floating_point() else v for k, v in sd.items()}]
    torch.save(inputs[1], tmp_path / "m2.pt")
    average_and_check([tmp_path / "m.pt", tmp_path / "m2.pt"], inputs, tmp_path / "o.safetensors", chunk_bytes=4096)
