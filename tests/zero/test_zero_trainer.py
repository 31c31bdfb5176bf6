"""The Transformers ``EMATrainer`` with a partitioned model on 2 CPU ranks: DeepSpeed ZeRO-3 and FSDP2.

One torchrun launch of ``_trainer_worker.py`` per set-up. Expectations: a float64 EMA of the whole training
weights gathered after every step; the evaluation loss against the exported EMA loaded into a plain model and
evaluated by hand; under ZeRO-3, the run cut at a checkpoint and resumed against the uninterrupted one, bit for
bit, and a checkpoint saved by another number of ranks refused before training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _launch import deepspeed_env, torchrun

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from _hf_common import TokenData, ema_reference, tiny_model
from _trainer_worker import SAVE_AT, SMOOTHING, STEPS

WORKER = Path(__file__).with_name("_trainer_worker.py")

pytestmark = pytest.mark.slow


def launch(out: Path, mode: str) -> list[dict[str, Any]]:
    torchrun(str(WORKER), str(out), mode, env=deepspeed_env(), what=f"EMATrainer {mode}")
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("trainer_zero3")
    return {"out": out, "ranks": launch(out, "zero3")}


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("trainer_fsdp2")
    return {"out": out, "ranks": launch(out, "fsdp2")}


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_is_the_oracle(exported: dict[str, torch.Tensor], after_step: list[dict[str, torch.Tensor]]) -> None:
    expected = ema_reference(after_step, SMOOTHING)
    assert len(after_step) >= 2 and expected
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, rtol=1e-6, atol=1e-7)


def loss_by_hand(path: Path, samples: slice) -> float:
    """The exported model's ``eval_loss`` as the Trainer counts it: the summed next-token cross-entropy over
    the number of labels (all of them: Transformers counts the label tokens before shifting)."""
    exported = load(path)
    assert torch.equal(exported["lm_head.weight"], exported["transformer.wte.weight"])  # tied: both the EMA
    model = tiny_model()
    model.load_state_dict(exported)
    tokens = TokenData(16, seed=1).tokens[samples]
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")
    return summed.item() / tokens.numel()


@pytest.mark.parametrize("setup", ["zero3", "fsdp2"])
def test_the_exported_ema_is_the_average_of_the_whole_weights_after_each_step(
    setup: str, request: pytest.FixtureRequest
) -> None:
    run = request.getfixturevalue(setup)
    rank0 = run["ranks"][0]
    assert rank0["zero3_params" if setup == "zero3" else "dtensor_params"]  # really partitioned / sharded
    assert len(rank0["weights"]) == STEPS
    assert_is_the_oracle(load(run["out"] / f"{setup}_ema.safetensors"), rank0["weights"])


def test_zero3_evaluation_runs_on_the_ema(zero3: dict[str, Any]) -> None:
    # the eval batches are split between the ranks and their losses gathered: the mean over all 16 sequences
    by_hand = loss_by_hand(zero3["out"] / "zero3_ema.safetensors", slice(None))
    for rank in zero3["ranks"]:
        assert rank["eval_loss"] == pytest.approx(by_hand, abs=2e-6)
        assert rank["unchanged_by_eval"]


def test_fsdp2_evaluation_runs_on_the_ema(fsdp2: dict[str, Any]) -> None:
    # the Trainer sees no distributed set-up here: each rank evaluates its own half and reports it
    for r, rank in enumerate(fsdp2["ranks"]):
        by_hand = loss_by_hand(fsdp2["out"] / "fsdp2_ema.safetensors", slice(8 * r, 8 * r + 8))
        assert rank["eval_loss"] == pytest.approx(by_hand, abs=2e-6)
        assert rank["unchanged_by_eval"]


def test_fsdp2_checkpoints_are_refused_before_training(fsdp2: dict[str, Any]) -> None:
    for rank in fsdp2["ranks"]:
        assert "save_strategy='steps' with a model sharded by fully_shard" in rank["saving"]
        assert "Set save_strategy='no'" in rank["saving"]


def test_zero3_checkpoints_hold_the_ema_and_each_ranks_partitions(zero3: dict[str, Any]) -> None:
    files = zero3["ranks"][0]["files"]
    assert {"ema_weights.safetensors", "emakit_ema_rank0.pt", "emakit_ema_rank1.pt"} <= set(files)
    assert "emakit_ema.pt" not in files
    folder = zero3["out"] / "full" / f"checkpoint-{SAVE_AT}"
    assert_is_the_oracle(load(folder / "ema_weights.safetensors"), zero3["ranks"][0]["weights"][:SAVE_AT])
    # each rank's file holds its own partitions: together they are the whole average, in rank order
    from emakit.checkpoint import read_checkpoint_file

    states = [read_checkpoint_file(folder / f"emakit_ema_rank{r}.pt")["ema"] for r in range(2)]
    whole = load(folder / "ema_weights.safetensors")
    for name, value in whole.items():
        if name in states[0]:
            joined = torch.cat([states[0][name], states[1][name]])[: value.numel()]
            assert torch.equal(joined.view(value.shape), value), name


def test_zero3_resume_continues_bit_for_bit(zero3: dict[str, Any]) -> None:
    for rank in zero3["ranks"]:
        assert rank["ema"].keys() == rank["resumed_ema"].keys()
        for name, value in rank["ema"].items():
            assert torch.equal(rank["resumed_ema"][name], value), name
        for name, value in rank["training"].items():
            assert torch.equal(rank["resumed_training"][name], value), name


def test_zero3_resume_on_another_number_of_ranks_is_refused_before_training(zero3: dict[str, Any]) -> None:
    for rank in zero3["ranks"]:
        assert (
            "holds the ZeRO-3 EMA partitions of 1 rank(s) (emakit_ema_rank0.pt), but this run has 2"
            in rank["other_world"]
        )
        assert "torchrun --nproc_per_node" in rank["other_world"]
        assert rank["other_world_step"] == SAVE_AT  # no step was taken
