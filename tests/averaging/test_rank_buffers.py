"""Reading each rank's own replicated buffers back from an averager's state (:mod:`emakit.averaging.replicated`).

The 2-rank runs (tests/distributed/test_fsdp_batchnorm.py, tests/integrations/test_lightning_fsdp_bn.py) check the
whole path; here the rank and world size are set by hand, to check which values a resume takes and what it refuses.
"""

from __future__ import annotations

import pytest
import torch

from emakit.averaging import replicated


def state_of(world_size: int, averages: list[dict[str, torch.Tensor]], training: dict[str, torch.Tensor]) -> dict:
    own = {"world_size": world_size, "averages": averages, "training": training}
    return {"rank_buffers": {"rank1": own, "rank0": {**own, "averages": [{}], "training": {}}}}


@pytest.fixture
def rank1_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicated, "get_rank", lambda: 1)
    monkeypatch.setattr(replicated, "get_world_size", lambda: 2)


def test_same_world_size_takes_this_ranks_own_values_over_the_mean(rank1_of_2: None) -> None:
    mean = {"fc.weight": torch.ones(2), "bn.running_mean": torch.full((3,), 0.5)}
    own = torch.tensor([0.1, 0.2, 0.3])
    state = state_of(2, [{"bn.running_mean": own}], {"bn.running_var": torch.tensor([2.0, 3.0, 4.0])})
    (restored,) = replicated.own_averages(state, [mean])
    assert torch.equal(restored["bn.running_mean"], own) and restored["fc.weight"] is mean["fc.weight"]
    assert torch.equal(replicated.own_training(state)["bn.running_var"], torch.tensor([2.0, 3.0, 4.0]))


def test_another_world_size_keeps_the_mean_and_no_training_values(rank1_of_2: None) -> None:
    mean = {"bn.running_mean": torch.full((3,), 0.5)}
    state = state_of(4, [{"bn.running_mean": torch.zeros(3)}], {"bn.running_mean": torch.zeros(3)})
    assert replicated.own_averages(state, [mean]) == [mean]
    assert replicated.own_training(state) == {}
    assert replicated.own_averages({}, [mean]) == [mean]  # a state saved without them


def test_a_state_whose_own_values_do_not_fit_the_averages_is_refused(rank1_of_2: None) -> None:
    mean = {"bn.running_mean": torch.full((3,), 0.5)}
    wrong_shape = state_of(2, [{"bn.running_mean": torch.zeros(4)}], {})
    with pytest.raises(
        ValueError, match=r"'rank_buffers': buffer 'bn.running_mean' has shape \(4,\), the average's \(3,\)"
    ):
        replicated.own_averages(wrong_shape, [mean])
    two_averages = state_of(2, [{}, {}], {})
    with pytest.raises(ValueError, match=r"'rank_buffers' must hold one dict per average \(1\)"):
        replicated.own_averages(two_averages, [mean])


def test_without_a_process_group_the_mean_is_the_value_itself() -> None:
    tensors = {"bn.running_mean": torch.tensor([1.0, 2.0]), "fc.weight": torch.ones(2)}
    out = replicated.mean_over_ranks(tensors, ["bn.running_mean", "absent"])
    assert torch.equal(out["bn.running_mean"], tensors["bn.running_mean"]) and out["fc.weight"] is tensors["fc.weight"]
