"""BEMA, the token clock and the growing half-life on an FSDP2 model over 2 CPU ranks (gloo): equal to one
process without FSDP to fp32 rounding, no collective in any update, and BEMA's theta_0 kept shard by shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _fsdp_rules_worker import RULES, Net, train
from _torchrun import two_ranks

from emakit._compat import FSDP2_TORCH, TORCH_VERSION

WORKER = Path(__file__).with_name("_fsdp_rules_worker.py")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        TORCH_VERSION < FSDP2_TORCH,
        reason=f"emakit shards with FSDP2 from torch {FSDP2_TORCH} on, not {torch.__version__}",
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return two_ranks(WORKER, tmp_path_factory.mktemp("rules_fsdp2"))


def whole(ranks: list[dict[str, Any]], rule: str, what: str) -> dict[str, torch.Tensor]:
    """The full tensors from the two ranks' dim-0 shards (FSDP2 gives rank 0 the first ceil(rows / 2) rows)."""
    names = ranks[0][rule][what]
    return {n: torch.cat([ranks[r][rule][what][n] for r in range(2)]) for n in names}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_two_ranks_equal_one_process_with_no_collective_per_update(ranks: list[dict[str, Any]], rule: str) -> None:
    torch.set_num_threads(1)
    model, averager = Net(), RULES[rule]()
    calls = train(model, averager, rank=None)
    assert calls == []
    assert ranks[0][rule]["calls"] == [] and ranks[1][rule]["calls"] == []
    assert ranks[0][rule]["timestamp"] == ranks[1][rule]["timestamp"] == averager.timestamp.state_dict()
    sharded, single = whole(ranks, rule, "evaluated"), averager.ema_tensors
    training = whole(ranks, rule, "training")
    worst = max((sharded[n] - single[n]).abs().max().item() for n in single)
    drift = max((training[n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
    print(
        f"FSDP2 2 ranks vs one process, {rule}: max |evaluated| difference {worst:.2e} (training weights {drift:.2e})"
    )
    assert set(sharded) == set(single) and worst < 1e-5


def test_bemas_theta_0_is_shard_local(ranks: list[dict[str, Any]]) -> None:
    for r in range(2):
        bema = ranks[r]["bema"]
        assert bema["theta_0_type"] == ["DTensor"]
        assert bema["theta_0_local_numel"] == bema["param_local_numel"]
    total = sum(sum(ranks[r]["bema"]["theta_0_local_numel"].values()) for r in range(2))
    assert total == sum(p.numel() for p in Net().parameters())
