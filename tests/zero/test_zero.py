"""The EMA under DeepSpeed ZeRO-3 (partition-local) and ZeRO-2, in DeepSpeed's own loop, on 2 CPU ranks.

One torchrun launch of ``_zero_worker.py`` per stage. Expectations: a float64 EMA of the whole training
weights gathered after every step; a plain module loaded with the exported EMA, evaluated by hand; the run
resumed from a DeepSpeed checkpoint and the per-rank EMA states against the uninterrupted one; ZeRO-2's EMA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _launch import deepspeed_env, torchrun

pytest.importorskip("deepspeed")
from _zero_worker import HALF_LIVES, SAVE_AT, SMOOTHING, STEPS, Adapted

WORKER = Path(__file__).with_name("_zero_worker.py")
TRAINABLE = ["lora_a.weight", "lora_b.weight", "head.weight", "head.bias"]

pytestmark = pytest.mark.slow


def run_stage(out: Path, stage: int, env: dict[str, str], *extra: str) -> list[dict[str, Any]]:
    torchrun(str(WORKER), str(out), str(stage), *extra, env=env, timeout=300, what=f"ZeRO-{stage} {' '.join(extra)}")
    name = extra[0] if extra else f"stage{stage}"
    return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("zero3")
    return {"out": out, "ranks": run_stage(out, 3, deepspeed_env())}


@pytest.fixture(scope="module")
def zero2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("zero2")
    return {"out": out, "ranks": run_stage(out, 2, deepspeed_env())}


@pytest.fixture(scope="module")
def zero3_bf16(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_stage(tmp_path_factory.mktemp("zero3_bf16"), 3, deepspeed_env(), "bf16")


@pytest.fixture(scope="module")
def zero3_persistent(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_stage(tmp_path_factory.mktemp("zero3_persistent"), 3, deepspeed_env(), "persistent")


def load_export(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def oracle(weights: list[dict[str, torch.Tensor]], smoothing: float = SMOOTHING) -> dict[str, torch.Tensor]:
    """The EMA in float64: a copy of the weights after the first step, then one blend per step."""
    ema = {n: t.double() for n, t in weights[0].items()}
    for step in weights[1:]:
        ema = {n: smoothing * ema[n] + (1 - smoothing) * step[n].double() for n in ema}
    return ema


def test_parameters_are_partitioned_and_the_ema_keeps_half(zero3: dict[str, Any]) -> None:
    for rank in zero3["ranks"]:
        for name, (placeholder, part, whole, _) in rank["layout"].items():
            assert placeholder == 0 and part == -(-whole // 2), name
        # the EMA holds this rank's elements of each trainable parameter, in fp32, and not the padding
        assert rank["ema_bytes"] == 4 * sum(rank["layout"][n][3] for n in TRAINABLE)
    assert zero3["ranks"][1]["layout"]["head.bias"] == (0, 2, 3, 1)


def test_update_runs_no_collective(zero3: dict[str, Any]) -> None:
    for rank in zero3["ranks"]:
        assert rank["calls"] == [[]] * STEPS


def test_export_equals_float64_oracle(zero3: dict[str, Any]) -> None:
    rank0 = zero3["ranks"][0]
    exported = load_export(zero3["out"] / "ema_stage3.safetensors")
    expected = oracle(rank0["weights"])
    assert set(exported) == set(expected)
    for name in TRAINABLE:
        assert exported[name].dtype == torch.float32
        torch.testing.assert_close(exported[name].double(), expected[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(exported["head.weight"], rank0["weights"][-1]["head.weight"])  # it averaged
    for name in ("base.weight", "base.bias"):  # frozen: not averaged, exported as they are
        assert torch.equal(exported[name], rank0["weights"][0][name])
        assert torch.equal(exported[name], rank0["weights"][-1][name])


def test_several_averages_and_the_sharded_layout(zero3: dict[str, Any]) -> None:
    out, weights = zero3["out"], zero3["ranks"][0]["weights"]
    for index, half_life in enumerate(HALF_LIVES):
        exported = load_export(out / f"several{index}_stage3.safetensors")
        expected = oracle(weights, 2 ** (-1 / int(half_life.removesuffix("ba"))))
        for name in TRAINABLE:
            torch.testing.assert_close(exported[name].double(), expected[name], rtol=1e-6, atol=1e-7)
    index = json.loads((out / "ema_stage3_sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    sharded: dict[str, torch.Tensor] = {}
    for name in files:
        sharded.update(load_export(out / "ema_stage3_sharded" / name))
    single = load_export(out / "ema_stage3.safetensors")
    assert set(sharded) == set(single) and all(torch.equal(sharded[n], single[n]) for n in single)


def test_eval_on_ema_equals_exported_ema_after_an_ordinary_eval(zero3: dict[str, Any]) -> None:
    rank0 = zero3["ranks"][0]
    # the ordinary eval forward left the trainable parameters gathered: the swap had to release them
    assert any(rank0["gathered_after_eval"])
    plain = Adapted()
    plain.load_state_dict(load_export(zero3["out"] / "ema_stage3.safetensors"))
    evaluation = rank0["eval"]
    with torch.no_grad():
        by_hand = plain(evaluation["x"])
    torch.testing.assert_close(evaluation["ema"], by_hand, rtol=1e-6, atol=1e-6)
    assert torch.equal(evaluation["ema_again"], evaluation["ema"])
    assert not torch.allclose(evaluation["ema"], evaluation["plain"])


def test_evaluation_leaves_training_weights_bitwise(zero3: dict[str, Any]) -> None:
    for rank in zero3["ranks"]:
        assert rank["unchanged"]
        assert torch.equal(rank["eval"]["plain_after"], rank["eval"]["plain"])
        for name, value in rank["weights"][-1].items():
            assert torch.equal(rank["weights_after_eval"][name], value), name


def test_resume_is_bitwise(zero3: dict[str, Any]) -> None:
    assert SAVE_AT < STEPS
    for rank in zero3["ranks"]:
        for name, value in rank["final_partitions"].items():
            assert torch.equal(rank["resumed_partitions"][name], value), name
        for name, value in rank["final_training"].items():
            assert torch.equal(rank["resumed_training"][name], value), name


def test_state_of_another_world_size_is_refused(zero3: dict[str, Any]) -> None:
    for rank in zero3["ranks"]:
        message = rank["other_world"]
        assert message is not None and "head.weight" in message
        assert "ZeRO-3 partition of 32 elements, this rank's has 48 (2 ranks)" in message
        assert "export_ema_weights" in message


def test_zero2_ema_equals_zero3(zero2: dict[str, Any], zero3: dict[str, Any]) -> None:
    two = load_export(zero2["out"] / "ema_stage2.safetensors")
    three = load_export(zero3["out"] / "ema_stage3.safetensors")
    assert set(two) == set(three)
    for name, value in three.items():
        torch.testing.assert_close(two[name], value, rtol=1e-6, atol=1e-7)
    for rank in zero2["ranks"]:
        assert rank["calls"] == [[]] * STEPS
        # ZeRO-2's parameters are whole on each rank, and so is its EMA (zero3's partitions are half of it)
        assert rank["ema_bytes"] == 4 * sum(rank["weights"][0][n].numel() for n in TRAINABLE)
    torch.testing.assert_close(zero2["ranks"][0]["eval"]["ema"], zero3["ranks"][0]["eval"]["ema"], rtol=1e-5, atol=1e-6)


def test_bf16_model_averages_the_fp32_master_partition(zero3_bf16: list[dict[str, Any]]) -> None:
    for rank in zero3_bf16:
        master, rounded = oracle(rank["masters"]), oracle(rank["bf16_parts"])
        for name in TRAINABLE:
            ema = rank["ema"][name]
            assert ema.dtype == torch.float32 and rank["bf16_parts"][0][name].dtype == torch.bfloat16
            torch.testing.assert_close(ema.double(), master[name], rtol=1e-6, atol=1e-7)
            # an average of the bf16 copies is off by their rounding, which the master's average is not
            assert (ema.double() - rounded[name]).abs().max() > 20 * (ema.double() - master[name]).abs().max()


def test_what_zero3_cannot_do_is_refused(zero3: dict[str, Any], zero2: dict[str, Any]) -> None:
    for rank in zero3["ranks"]:
        assert "snapshot_folder is not supported for a DeepSpeed ZeRO-3 model" in rank["refused"]["snapshots"]
        assert "ema_model is not available for a DeepSpeed ZeRO-3 model" in rank["refused"]["ema_model"]
    for rank in zero2["ranks"]:  # whole parameters: snapshots and ema_model work
        assert rank["refused"] == {}


def test_persistent_parameters_evaluate_on_the_ema_and_train_on_unchanged(
    zero3_persistent: list[dict[str, Any]],
) -> None:
    for rank in zero3_persistent:
        assert all(rank["persistent"])  # gathered between forwards: the swap must release them both ways
        evaluated, plain = rank[True], rank[False]
        for name, value in plain["training"].items():
            assert torch.equal(evaluated["training"][name], value), name
        for name, value in plain["ema"].items():
            assert torch.equal(evaluated["ema"][name], value), name
        by_hand = Adapted()
        average = oracle(evaluated["weights"][:SAVE_AT])
        by_hand.load_state_dict({n: t.float() for n, t in average.items()})
        with torch.no_grad():
            expected = by_hand(rank["x"])
        torch.testing.assert_close(rank["on_ema"], expected, rtol=1e-5, atol=1e-6)


def test_padding_of_the_partitions_is_not_averaged(zero3: dict[str, Any]) -> None:
    """The worker filled the partitions' padding with NaN: an EMA with skip_nonfinite never skips, and the
    exports and evaluations above matched their oracles all the same."""
    for rank in zero3["ranks"]:
        assert rank["guarded"]["skipped"] == 0
        for name, value in rank["final_partitions"].items():
            assert torch.equal(rank["guarded"]["ema"][name], value), name
            assert value.isfinite().all(), name
