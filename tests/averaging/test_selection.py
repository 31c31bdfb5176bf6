"""What the EMA keeps (``params``) and what it does with floating buffers (``buffers``), against a naive loop.

A model with half its layers frozen: the EMA of the trainable parameters equals a hand-written average, the
frozen ones are neither averaged nor copied (the EMA's bytes are the selected tensors' bytes, ``ema_model``
shares the frozen tensors' memory). BatchNorm statistics averaged, copied or left to the model. The set is
fixed when the average starts (issue #24 item 6), and a resumed state keeps its own set.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from emakit import EMA, export_ema_weights


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).to(dtype)


def frozen_half(model: nn.Module) -> nn.Module:
    model[0].requires_grad_(False)
    model[3].requires_grad_(False)
    return model


def train(model: nn.Module, ema: EMA, steps: int, seed: int = 1, hook=None) -> list[dict[str, torch.Tensor]]:
    """SGD steps on random batches; returns the model's state after each step (for the reference)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.05, momentum=0.9)
    records = []
    for step in range(1, steps + 1):
        if hook is not None:
            hook(step, model, opt)
        x = torch.randn(8, 6, generator=gen).to(next(model.parameters()).dtype)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        records.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        ema.step()
    return records


def naive(records, names, smoothing: float, start: int = 1, copied=()) -> dict[str, torch.Tensor]:
    """The average of ``names`` by hand: a copy at step ``start``, then ``s * avg + (1 - s) * w`` each step."""
    average: dict[str, torch.Tensor] = {}
    for step, weights in enumerate(records, start=1):
        if step < start:
            continue
        for name in names:
            w = weights[name]
            if step == start or not w.is_floating_point() or name in copied:
                average[name] = w.double() if w.is_floating_point() else w.clone()
            else:
                average[name] = smoothing * average[name] + (1 - smoothing) * w.double()
    return average


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def assert_close(ema: EMA, expected: dict[str, torch.Tensor]) -> None:
    got = ema.ema_tensors
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], value), name


FROZEN = {"0.weight", "0.bias", "3.weight", "3.bias"}
TRAINABLE = {"1.weight", "1.bias", "5.weight", "5.bias"}
BUFFERS = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


@pytest.mark.parametrize("flatten", [False, True])
def test_trainable_params_are_averaged_frozen_ones_are_neither_averaged_nor_copied(flatten: bool) -> None:
    model = frozen_half(make_net())
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in FROZEN}
    ema = EMA(smoothing=0.8, params="trainable", flatten_model=flatten)
    ema.attach(model)
    records = train(model, ema, 7)
    assert_close(ema, naive(records, TRAINABLE | BUFFERS, 0.8))
    # the EMA holds the selected tensors only: its bytes are theirs
    selected = [t for n, t in model.state_dict().items() if n in TRAINABLE | BUFFERS]
    assert nbytes(ema.state_dict()["ema"].values()) == nbytes(selected)
    assert ema.storage is not None and ema.storage.nbytes < nbytes(selected) + 4 * 16 * len(selected)
    # ema_model shares the frozen tensors; the swap leaves them in place; both equal the untouched originals
    ema_model = ema.ema_model
    for name in FROZEN:
        module, key = name.split(".")
        assert getattr(ema_model[int(module)], key).data_ptr() == getattr(model[int(module)], key).data_ptr()
        assert torch.equal(getattr(model[int(module)], key), frozen_before[name])
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    with ema.average_parameters():
        assert torch.equal(model[5].weight, ema.ema_tensors["5.weight"])
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    # the published model state and the export hold the model's own values for the frozen layers
    published = ema.published_model_state(model.state_dict())
    for name in FROZEN:
        assert torch.equal(published[name], frozen_before[name])


def test_all_averages_frozen_parameters_too() -> None:
    model = frozen_half(make_net())
    ema = EMA(smoothing=0.8, params="all")
    ema.attach(model)
    records = train(model, ema, 4)
    assert_close(ema, naive(records, FROZEN | TRAINABLE | BUFFERS, 0.8))
    assert nbytes(ema.state_dict()["ema"].values()) == nbytes(model.state_dict().values())


def test_patterns_and_a_predicate_choose_by_name() -> None:
    model = make_net()
    ema = EMA(smoothing=0.7, params=["5.*", "1.weight"])
    ema.attach(model)
    other = EMA(smoothing=0.7, params=lambda name, tensor: name.startswith("5.") or name == "1.weight")
    other.attach(model)
    records = train(model, _Both(ema, other), 5)
    expected = naive(records, {"5.weight", "5.bias", "1.weight"} | BUFFERS, 0.7)
    assert_close(ema, expected)
    assert_close(other, expected)


class _Both:
    """Steps two EMAs of one model."""

    def __init__(self, *emas: EMA) -> None:
        self.emas = emas

    def step(self) -> None:
        for ema in self.emas:
            ema.step()


def test_bf16_model_keeps_an_fp32_master_of_the_selected_tensors_only() -> None:
    model = frozen_half(make_net(dtype=torch.bfloat16))
    ema = EMA(smoothing=0.8)
    ema.attach(model)
    train(model, ema, 3)
    selected = [t for n, t in model.state_dict().items() if n in TRAINABLE | BUFFERS]
    fp32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in selected)
    assert nbytes(ema.state_dict()["ema"].values()) == fp32
    assert ema.ema_model[0].weight.data_ptr() == model[0].weight.data_ptr()


@pytest.mark.parametrize("policy", ["average", "copy", "share"])
def test_batchnorm_statistics_under_each_buffer_policy(policy: str, tmp_path: Path) -> None:
    model = make_net()
    ema = EMA(smoothing=0.6, buffers=policy)
    ema.attach(model)
    records = train(model, ema, 6)
    stats = {"1.running_mean", "1.running_var"}
    names = {n for n, p in model.named_parameters()} | {"1.num_batches_tracked"}
    if policy != "share":
        names |= stats
    assert_close(ema, naive(records, names, 0.6, copied=stats if policy == "copy" else ()))
    running = model[1].running_mean
    if policy == "share":  # left alone: ema_model, the swap and the export see the model's own statistics
        assert ema.ema_model[1].running_mean.data_ptr() == running.data_ptr()
        with ema.average_parameters():
            assert model[1].running_mean.data_ptr() == running.data_ptr()
            assert torch.equal(model[1].running_mean, records[-1]["1.running_mean"])
        path = export_ema_weights(ema, tmp_path / "ema.pt")
        assert path is not None
        exported = torch.load(path, weights_only=True)
        assert torch.equal(exported["1.running_var"], model[1].running_var)
    elif policy == "copy":
        assert torch.equal(ema.ema_model[1].running_var, records[-1]["1.running_var"])


def test_buffer_policy_by_name_first_match_wins() -> None:
    model = make_net()
    ema = EMA(smoothing=0.6, buffers={"1.running_var": "share", "*": "copy"})
    ema.attach(model)
    records = train(model, ema, 4)
    names = {n for n, _ in model.named_parameters()} | {"1.running_mean", "1.num_batches_tracked"}
    assert_close(ema, naive(records, names, 0.6, copied={"1.running_mean"}))


def test_copy_policy_with_several_averages() -> None:
    model = make_net()
    ema = EMA(half_life=["2ba", "5ba"], buffers="copy")
    ema.attach(model)
    records = train(model, ema, 5)
    names = {n for n in model.state_dict()}
    stats = {"1.running_mean", "1.running_var"}
    for j, half_life in enumerate((2, 5)):
        expected = naive(records, names, 2 ** (-1 / half_life), copied=stats)
        got = ema.state_dict()["ema"] if j == 0 else ema.state_dict()["more_averages"][0]
        for name, value in expected.items():
            torch.testing.assert_close(got[name].double(), value.double(), rtol=1e-5, atol=1e-6)


def test_the_set_is_decided_when_the_average_starts() -> None:
    """Issue #24 item 6: a layer frozen at attach and unfrozen before ema_start is averaged; the set then stays."""
    model = frozen_half(make_net())

    def unfreeze_then_freeze(step: int, model: nn.Module, opt) -> None:
        if step == 3:  # before the start at step 4
            model[0].requires_grad_(True)
        if step == 6:  # after the start: the set does not change
            model[5].requires_grad_(False)
            model[3].requires_grad_(True)

    ema = EMA(smoothing=0.75, ema_start="4ba")
    ema.attach(model)
    records = train(model, ema, 8, hook=unfreeze_then_freeze)
    expected = naive(records, {"0.weight", "0.bias"} | TRAINABLE | BUFFERS, 0.75, start=4)
    assert_close(ema, expected)
    assert not torch.equal(ema.ema_tensors["0.weight"].to(torch.float32), model[0].weight)  # an average, not a copy
    # a resumed state keeps its set, whatever requires_grad says now
    resumed = EMA(smoothing=0.75, ema_start="4ba")
    resumed.attach(model)
    resumed.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert sorted(resumed.ema_tensors) == sorted(expected)
    more = train(model, _Both(ema, resumed), 3, seed=5)
    assert len(more) == 3
    for name, value in ema.ema_tensors.items():
        assert torch.equal(resumed.ema_tensors[name], value)
    assert resumed.ema_model[3].weight.data_ptr() == model[3].weight.data_ptr()  # not averaged: shared


def test_overlap_with_a_selection_changed_at_the_start() -> None:
    model = frozen_half(make_net())
    reference_model = copy.deepcopy(model)
    ema = EMA(smoothing=0.75, ema_start="2ba", overlap=True)
    plain = EMA(smoothing=0.75, ema_start="2ba")
    ema.attach(model)
    plain.attach(reference_model)

    def unfreeze(step: int, m: nn.Module, opt) -> None:
        if step == 2:
            m[0].requires_grad_(True)

    train(model, ema, 5, hook=unfreeze)
    train(reference_model, plain, 5, hook=unfreeze)
    ema.wait()
    assert sorted(ema.ema_tensors) == sorted(plain.ema_tensors)
    for name, value in plain.ema_tensors.items():
        assert torch.equal(ema.ema_tensors[name], value), name


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"params": "frozen"}, ValueError, "params must be 'trainable', 'all'"),
        ({"params": []}, ValueError, "params must be"),
        ({"params": 3}, TypeError, "params must be"),
        ({"buffers": "avg"}, ValueError, "buffers must be one of 'average', 'copy', 'share'"),
        ({"buffers": {"1.*": "keep"}}, ValueError, "the policy for '1.*' must be one of"),
        ({"buffers": {}}, ValueError, "buffers must be"),
    ],
)
def test_bad_choices_fail_in_the_constructor(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        EMA(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"params": ["5.*", "lora_*"]}, "the pattern 'lora_\\*' matches no parameter"),
        ({"params": lambda name, tensor: False}, "the callable accepts no parameter"),
        ({"buffers": {"bn.running_*": "copy"}}, "the pattern 'bn.running_\\*' matches no buffer"),
    ],
)
def test_a_choice_naming_nothing_fails_at_attach(kwargs: dict, message: str) -> None:
    ema = EMA(**kwargs)
    with pytest.raises(ValueError, match=message):
        ema.attach(make_net())


def test_trainable_with_nothing_trainable_at_the_start_fails_there() -> None:
    model = make_net().requires_grad_(False)
    ema = EMA(smoothing=0.5, ema_start="2ba")
    ema.attach(model)  # may still be unfrozen before the start
    ema.step()
    with pytest.raises(ValueError, match="none does"):
        ema.step()


def test_a_resumed_state_must_hold_what_a_fixed_selection_names() -> None:
    model = make_net()
    ema = EMA(smoothing=0.5, params="all")
    ema.attach(model)
    train(model, ema, 2)
    state = ema.state_dict()
    resumed = EMA(smoothing=0.5, params="all")
    resumed.attach(model)
    with pytest.raises(ValueError, match=r"EMA state has no tensor '5\.bias'"):
        resumed.load_state_dict(dict(state, ema={k: v for k, v in state["ema"].items() if k != "5.bias"}))
    assert not resumed.started  # nothing changed
    # under 'trainable' the state's parameters are those that required grad at its start
    trainable = EMA(smoothing=0.5)
    trainable.attach(model)
    trainable.load_state_dict(dict(state, ema={k: v for k, v in state["ema"].items() if k != "5.bias"}))
    assert "5.bias" not in trainable.ema_tensors and "5.weight" in trainable.ema_tensors
    with pytest.raises(ValueError, match=r"EMA state has no tensor '1\.running_var'"):
        trainable.load_state_dict(dict(state, ema={k: v for k, v in state["ema"].items() if k != "1.running_var"}))
    assert "5.bias" not in trainable.ema_tensors  # the failed load changed nothing


@settings(max_examples=60, deadline=None)
@given(
    patterns=st.lists(st.sampled_from(["0.*", "1.*", "3.*", "5.*", "*.bias", "*.weight", "?.weight"]), min_size=1),
    policies=st.dictionaries(
        st.sampled_from(["1.running_mean", "1.running_var", "1.*", "*"]),
        st.sampled_from(["average", "copy", "share"]),
        max_size=3,
    ),
)
def test_any_selection_keeps_exactly_what_it_names(patterns: list[str], policies: dict[str, str]) -> None:
    """Property: the kept set is the matched parameters, the buffers whose first matching policy is not 'share',
    and the integer buffer; exactly the 'copy' ones are copied. Checked against a hand-written matcher."""
    model = make_net()
    ema = EMA(smoothing=0.5, params=patterns, buffers=policies or "average")
    ema.attach(model)
    ema.step()

    def match(name: str, pattern: str) -> bool:  # '*' any run of characters, '?' one character
        import re

        return re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*").replace("?", "."), name) is not None

    params = [n for n, _ in model.named_parameters() if any(match(n, p) for p in patterns)]
    kept_buffers, copied = ["1.num_batches_tracked"], []
    for name in ("1.running_mean", "1.running_var"):
        policy = next((v for k, v in policies.items() if match(name, k)), "average")
        if policy != "share":
            kept_buffers.append(name)
        if policy == "copy":
            copied.append(name)
    assert sorted(ema.ema_tensors) == sorted(params + kept_buffers)
    assert sorted(ema._tracked.copied) == sorted(copied)
