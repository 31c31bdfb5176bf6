"""The streaming safetensors writer, the shard plan, size parsing, and exports of an unsharded EMA in each layout.

Expectations: safetensors' and Transformers' own readers, the single-file export, and the sizes themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from emakit import EMA, export_ema_weights
from emakit.checkpoint.streaming import parse_size, plan_shards
from emakit.safetensors_file import TensorEntry, write_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@given(st.integers(1, 10**6), st.sampled_from(sorted(UNITS)), st.sampled_from([str.lower, str.upper, str]))
def test_parse_size_reads_numbers_with_decimal_and_binary_units(number: int, unit: str, case: object) -> None:
    assert parse_size(f"{number}{case(unit)}") == number * UNITS[unit]  # type: ignore[operator]
    assert parse_size(number) == number


@given(st.one_of(st.integers(max_value=0), st.sampled_from(["", "GB", "5 XB", "-1GB", "1e3", "0MB", "five"])))
def test_parse_size_refuses_bad_values_naming_the_argument_and_value(value: object) -> None:
    with pytest.raises(ValueError, match=f"max_shard_size must be a positive number.*got {value!r}"):
        parse_size(value)  # type: ignore[arg-type]


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 150))
def test_plan_keeps_order_and_every_file_under_the_limit_unless_one_tensor_is_larger(
    sizes: list[int], limit: int
) -> None:
    entries = [TensorEntry(f"t{i}", (n,), torch.uint8, lambda: torch.empty(0)) for i, n in enumerate(sizes)]
    shards = plan_shards(entries, limit)
    assert [e.name for shard in shards for e in shard] == [e.name for e in entries]
    for i, shard in enumerate(shards):
        total = sum(e.nbytes for e in shard)
        assert total <= limit or len(shard) == 1
        if i + 1 < len(shards) and shards[i + 1]:  # greedy: the next file's first tensor did not fit here
            assert total + shards[i + 1][0].nbytes > limit


def test_writer_round_trips_every_dtype_and_reads_each_tensor_only_when_writing_it(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(1).double(),
        "i64": torch.arange(7),
        "u8": torch.arange(3, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 5),
    }
    reads: list[str] = []

    def reader(name: str) -> torch.Tensor:
        reads.append(name)
        return tensors[name]

    entries = [TensorEntry(n, tuple(t.shape), t.dtype, lambda n=n: reader(n)) for n, t in tensors.items()]
    path = write_safetensors(entries, tmp_path / "w.safetensors", overwrite=False)
    assert reads == list(tensors)  # once each, in order
    loaded = safetensors_torch.load_file(str(path))
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what Transformers requires of a weights file
    assert not list(tmp_path.glob(".*tmp"))


def test_writer_refuses_a_tensor_other_than_announced_and_leaves_no_file(tmp_path: Path) -> None:
    entries = [TensorEntry("a", (2,), torch.float32, lambda: torch.zeros(3))]
    with pytest.raises(RuntimeError, match=r"'a' read as \(3,\).*announced as \(2,\)"):
        write_safetensors(entries, tmp_path / "w.safetensors", overwrite=False)
    assert list(tmp_path.iterdir()) == []


class Vocab(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(101, 16)
        self.fc = nn.Linear(16, 7)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def trained_ema() -> tuple[EMA, Vocab]:
    torch.manual_seed(0)
    model = Vocab()
    ema = EMA(half_life="2ba")
    ema.attach(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.steps += 1
        ema.step()
    return ema, model


def test_sharded_layout_loads_into_the_model_and_equals_the_single_file(tmp_path: Path) -> None:
    ema, _ = trained_ema()
    export_ema_weights(ema, tmp_path / "one.safetensors")
    single = safetensors_torch.load_file(str(tmp_path / "one.safetensors"))
    assert export_ema_weights(ema, tmp_path / "folder", max_shard_size="4KB") == tmp_path / "folder"
    index = json.loads((tmp_path / "folder" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3  # emb.weight is 6464 bytes, over the limit alone; fc.* and steps share the rest
    loaded = {}
    for name in files:
        part = safetensors_torch.load_file(str(tmp_path / "folder" / name))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 4000 or len(part) == 1
        loaded.update(part)
    fresh = Vocab()
    fresh.load_state_dict(loaded, strict=True)
    for name, value in single.items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # everything fits one file: model.safetensors alone, as save_pretrained writes it
    export_ema_weights(ema, tmp_path / "whole", max_shard_size="1GB")
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["model.safetensors"]
    assert safetensors_torch.load_file(str(tmp_path / "whole" / "model.safetensors")).keys() == single.keys()


def test_accelerate_and_transformers_load_the_sharded_layout(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    accelerate_utils = pytest.importorskip("accelerate.utils")
    config = transformers.GPT2Config(vocab_size=101, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ema = EMA(half_life="2ba")
    ema.attach(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ema.step()
    folder = tmp_path / "gpt2"
    export_ema_weights(ema, folder, max_shard_size="20KB")
    config.save_pretrained(folder)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    expected = {n: t.clone() for n, t in ema.ema_model.state_dict().items()}

    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    torch.manual_seed(1)
    other = transformers.GPT2LMHeadModel(config)
    accelerate_utils.load_checkpoint_in_model(other, str(folder))
    for name, value in other.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_bad_max_shard_size_and_a_file_in_place_of_the_folder_are_refused(tmp_path: Path) -> None:
    ema, _ = trained_ema()
    with pytest.raises(ValueError, match=r"max_shard_size must be a positive number.*got '10 parsecs'"):
        export_ema_weights(ema, tmp_path / "f", max_shard_size="10 parsecs")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="must be a folder for a sharded export"):
        export_ema_weights(ema, tmp_path / "file", max_shard_size=100)
    assert (tmp_path / "file").read_text() == "mine"
