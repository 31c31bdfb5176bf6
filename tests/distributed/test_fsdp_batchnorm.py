"""BatchNorm under emakit's Trainer(parallelism='fsdp') on 2 ranks: one rule for what is written, exact resume.

FSDP2 does not synchronise buffers, so each rank's BatchNorm statistics and its average of them are its own. The
export, the DCP checkpoint (its published model and the EMA's state) and the sharded snapshots must hold the mean
over the ranks of each rank's averaged buffers (the oracle: the per-rank values the worker saved, averaged here
in float64); a resume from the mid-epoch checkpoint must continue every rank's own sequence bit for bit (the
oracle: the uninterrupted run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _batchnorm_ranks import (
    FLOATING,
    check_own_entries,
    check_own_statistics,
    check_resumed_bitwise,
    launch,
    mean_of_ranks,
)

from emakit._compat import FSDP2_TORCH, TORCH_VERSION
from emakit.checkpoint import read_sharded_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TORCH_VERSION < FSDP2_TORCH, reason=f"emakit shards with FSDP2 from torch {FSDP2_TORCH} on"),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(Path(__file__).with_name("_fsdp_bn_worker.py"), tmp_path_factory.mktemp("fsdp_bn"))


def test_each_rank_averages_its_own_statistics_and_counts_alike(ranks: dict[str, Any]) -> None:
    check_own_statistics(ranks, forward_passes=8)


def test_export_checkpoint_and_snapshot_hold_the_mean_over_ranks(ranks: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    exported = load_file(str(ranks["out"] / "export.safetensors"))
    saved = read_sharded_checkpoint(ranks["out"] / "ckpt" / "ep2-ba8")
    assert saved["model_weights"] == "published"
    snapshot = read_sharded_checkpoint(ranks["out"] / "snapshots" / "snapshot-000001")  # after the 8th step
    state = saved["state"]["algorithms"]["EMA"]
    for name in FLOATING:
        mean = mean_of_ranks(ranks, name)
        assert torch.equal(exported[name], mean), name
        assert torch.equal(saved["state"]["model"][name], mean), name
        assert torch.equal(state["ema"][name], mean), name
        assert torch.equal(snapshot[f"0/{name}"], mean), name
    check_own_entries(ranks, state["rank_buffers"])  # and each rank's own, for the resume


def test_resume_continues_every_ranks_own_buffers_bitwise(ranks: dict[str, Any]) -> None:
    check_resumed_bitwise(ranks, n_averaged=8)


def test_bema_resume_continues_every_ranks_own_theta_0_buffers_bitwise(ranks: dict[str, Any]) -> None:
    """BEMA's evaluated weights read theta_0 (the weights at its start), which each rank keeps for its buffers."""
    check_resumed_bitwise(ranks, n_averaged=8, prefix="bema_")


def test_state_dict_on_rank_0_alone_fails_within_the_timeout_naming_the_call(ranks: dict[str, Any]) -> None:
    message = ranks["ranks"][0]["rank0_only"]
    assert "only 1 of 2 ranks reached it within 2 s" in message
    assert "BatchNorm buffers FSDP2 leaves unsynchronised" in message and "not inside `if rank == 0:`" in message
