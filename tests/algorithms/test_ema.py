"""The EMA algorithm: arguments, smoothing, timing against a hand-written reference loop, storage, swaps."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TinyNet, make_loader, make_model
from emakit import EMA
from emakit.algorithms import Averaging
from emakit.core import Callback, Event
from emakit.time import Time
from emakit.trainer import Trainer

# ---------------------------------------------------------------- a reference loop, written from the spec


def reference_run(
    *,
    epochs: int,
    batches_per_epoch: int,
    unit: str,
    interval: int,
    smoothing: float,
    starts: Any,
    seed: int = 0,
    max_batches: int | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor] | None, int | None, int]:
    """Train like the Trainer (SGD lr 0.1, cross-entropy) and keep the EMA per the documented rules.

    ``starts(batch, epoch)`` says whether training progress has reached ema_start at an update event.
    Returns (model, ema tensors, count at initialisation, number of blends).
    """
    model = make_model(seed)
    loader = make_loader(n=8 * batches_per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema: dict[str, torch.Tensor] | None = None
    start_count, blends, batch = None, 0, 0

    def event(count: int, epoch: int) -> None:
        nonlocal ema, start_count, blends
        tracked = dict(model.named_parameters()) | dict(model.named_buffers())
        if ema is None:
            if starts(batch, epoch):
                ema = {n: t.detach().clone() for n, t in tracked.items()}
                start_count = count
        elif count % interval == 0:
            for n, t in tracked.items():
                if t.is_floating_point():
                    ema[n] = smoothing * ema[n] + (1 - smoothing) * t.detach()
                else:
                    ema[n] = t.detach().clone()
            blends += 1

    model.train()
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            batch += 1
            if unit == "ba":
                event(batch, epoch)
            if max_batches is not None and batch >= max_batches:
                return model, ema, start_count, blends
        if unit == "ep":
            event(epoch + 1, epoch + 1)
    return model, ema, start_count, blends


def run_trainer(ema: EMA, max_duration: str, batches_per_epoch: int, **kwargs: Any) -> Trainer:
    trainer = Trainer(
        model=make_model(0),
        train_dataloader=make_loader(n=8 * batches_per_epoch),
        max_duration=max_duration,
        algorithms=[ema],
        progress_bar=False,
        **kwargs,
    )
    trainer.fit()
    return trainer


def assert_ema_equals(ema: EMA, expected: dict[str, torch.Tensor]) -> None:
    got = ema.ema_tensors
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- smoothing and arguments


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"half_life": "10ba"}, 2**-0.1),
        ({"half_life": "10ba", "update_interval": "2ba"}, 2**-0.2),
        ({"half_life": "1ep"}, 0.5),
        ({"half_life": "4ep", "update_interval": "2ep"}, 2**-0.5),
        ({"half_life": "1000ba"}, 2**-0.001),
        ({}, 2**-0.001),
        ({"smoothing": 0.99}, 0.99),
        ({"half_life": None, "smoothing": 0.9}, 0.9),
    ],
)
def test_smoothing_is_derived_once(kwargs: dict[str, Any], expected: float) -> None:
    assert EMA(**kwargs).schedule.smoothing == pytest.approx(expected, rel=1e-15)


def test_default_update_interval() -> None:
    assert EMA(half_life="10ep").update_interval == Time(1, "ep")
    assert EMA(half_life="10ba").update_interval == Time(1, "ba")
    assert EMA(smoothing=0.9).update_interval == Time(1, "ba")  # the reference crashes here


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"half_life": "10ba", "smoothing": 0.9},
            ValueError,
            r"exactly one of half_life, smoothing and sigma_rel, got half_life='10ba', smoothing=0\.9",
        ),
        ({"half_life": "-10ba"}, ValueError, r"half_life must be greater than 0, got '-10ba'"),
        ({"half_life": None}, ValueError, r"exactly one of half_life, smoothing and sigma_rel, got none"),
        ({"half_life": "10sp"}, ValueError, r"half_life: got '10sp'; accepted units: 'ba', 'ep'"),
        ({"half_life": "0.5dur"}, ValueError, r"half_life: .*accepted units: 'ba', 'ep'"),
        ({"half_life": "0ba"}, ValueError, r"half_life must be greater than 0, got '0ba'"),
        ({"half_life": "1.5ep"}, ValueError, r"half_life: '1.5ep'"),
        ({"half_life": "ten"}, ValueError, r"half_life: 'ten' is not a time.*'ba' \(batches\), 'ep' \(epochs\)$"),
        ({"half_life": 10}, TypeError, r"half_life"),
        (
            {"half_life": "10ba", "update_interval": "1ep"},
            ValueError,
            r"update_interval must be in half_life's unit 'ba'",
        ),
        (
            {"half_life": "10ba", "update_interval": "0ba"},
            ValueError,
            r"update_interval must be greater than 0, got '0ba'",
        ),
        ({"smoothing": 0.9, "update_interval": "3sp"}, ValueError, r"update_interval: got '3sp'; accepted units"),
        ({"smoothing": 1.5}, ValueError, r"smoothing must be a real number in \[0, 1\], got 1.5"),
        ({"smoothing": -0.1}, ValueError, r"smoothing must be a real number in \[0, 1\], got -0.1"),
        ({"smoothing": float("nan")}, ValueError, r"smoothing must be a real number in \[0, 1\], got nan"),
        ({"smoothing": "0.9"}, ValueError, r"smoothing must be a real number in \[0, 1\], got '0.9'"),
        ({"ema_start": "2dur"}, ValueError, r"ema_start in 'dur' must be in \[0, 1\], got '2.0dur'"),
        ({"ema_start": "soon"}, ValueError, r"ema_start: 'soon' is not a time"),
        ({"fp32_ema": "yes"}, TypeError, r"fp32_ema must be a bool, got 'yes'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EMA(**kwargs)


def test_ema_start_after_max_duration_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"ema_start='20ba' is after max_duration='10ba'"):
        Trainer(make_model(0), make_loader(), "10ba", algorithms=[EMA(ema_start="20ba")], progress_bar=False)


# ---------------------------------------------------------------- timing vs the reference loop


class Probe(Callback):
    """Records, at every update event, whether the EMA had started and how many blends it had done."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.log: list[tuple[int, bool, int]] = []

    def batch_end(self, state: Any, logger: Any) -> None:
        self.log.append((state.timestamp.batch, self.ema.started, (self.ema.n_averaged - 1)))


@pytest.mark.parametrize(
    ("ema_kwargs", "max_duration", "bpe", "expected_start", "starts"),
    [
        ({"half_life": "4ba", "ema_start": "0.5dur"}, "10ba", 10, 5, lambda b, e: b >= 5),
        ({"half_life": "4ba", "ema_start": "3ba"}, "2ep", 4, 3, lambda b, e: b >= 3),
        ({"half_life": "4ba", "ema_start": "1ep"}, "2ep", 8, 9, lambda b, e: e >= 1),
        ({"half_life": "4ba", "ema_start": "24sp"}, "2ep", 4, 3, lambda b, e: b * 8 >= 24),
        ({"half_life": "4ba"}, "2ep", 4, 1, lambda b, e: True),
    ],
)
def test_start_point_matches_reference(
    ema_kwargs: dict[str, Any], max_duration: str, bpe: int, expected_start: int, starts: Any
) -> None:
    ema = EMA(**ema_kwargs)
    probe = Probe(ema)
    trainer = run_trainer(ema, max_duration, bpe, callbacks=[probe])
    epochs = int(max_duration[:-2]) if max_duration.endswith("ep") else 1
    max_batches = int(max_duration[:-2]) if max_duration.endswith("ba") else None
    model, ref_ema, ref_start, ref_blends = reference_run(
        epochs=epochs,
        batches_per_epoch=bpe,
        unit="ba",
        interval=1,
        smoothing=ema.schedule.smoothing,
        starts=starts,
        max_batches=max_batches,
    )
    assert ema.start_count == ref_start == expected_start
    assert (ema.n_averaged - 1) == ref_blends
    first_started = next(batch for batch, started, _ in probe.log if started)
    assert first_started == expected_start
    assert ref_ema is not None
    assert_ema_equals(ema, ref_ema)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trainer.state.model.state_dict()[name], value, msg=name)


def test_update_interval_skips_odd_batches() -> None:
    ema = EMA(half_life="6ba", update_interval="2ba")
    probe = Probe(ema)
    run_trainer(ema, "1ep", 8, callbacks=[probe])
    # initialised at batch 1, blends at 2, 4, 6, 8
    assert [n for _, _, n in probe.log] == [0, 1, 1, 2, 2, 3, 3, 4]
    _, ref_ema, _, blends = reference_run(
        epochs=1, batches_per_epoch=8, unit="ba", interval=2, smoothing=2 ** -(2 / 6), starts=lambda b, e: True
    )
    assert blends == 4
    assert ref_ema is not None
    assert_ema_equals(ema, ref_ema)


def test_epoch_units_update_at_epoch_end() -> None:
    ema = EMA(half_life="1ep")
    probe = Probe(ema)
    run_trainer(ema, "3ep", 4, callbacks=[probe])
    assert ema.schedule.smoothing == 0.5
    assert ema.start_count == 1 and (ema.n_averaged - 1) == 2
    # no change during an epoch's batches: only EPOCH_END moves it
    assert [started for _, started, _ in probe.log[:4]] == [False] * 4
    _, ref_ema, _, blends = reference_run(
        epochs=3, batches_per_epoch=4, unit="ep", interval=1, smoothing=0.5, starts=lambda b, e: True
    )
    assert blends == 2 and ref_ema is not None
    assert_ema_equals(ema, ref_ema)


def test_epoch_units_with_interval_and_dur_start() -> None:
    ema = EMA(half_life="2ep", update_interval="2ep", ema_start="0.25dur")
    run_trainer(ema, "8ep", 2, callbacks=[])
    # 0.25dur of 8 epochs: initialised at the end of epoch 2; blends at epochs 4, 6, 8
    assert ema.start_count == 2 and (ema.n_averaged - 1) == 3
    _, ref_ema, _, _ = reference_run(
        epochs=8, batches_per_epoch=2, unit="ep", interval=2, smoothing=0.5, starts=lambda b, e: e >= 2
    )
    assert ref_ema is not None
    assert_ema_equals(ema, ref_ema)


# ---------------------------------------------------------------- storage, ema_model and swapping


def trained_ema(model: nn.Module | None = None, **kwargs: Any) -> tuple[Trainer, EMA]:
    ema = EMA(half_life="2ba", **kwargs)
    trainer = Trainer(
        model if model is not None else make_model(0), make_loader(), "1ep", algorithms=[ema], progress_bar=False
    )
    trainer.fit()
    return trainer, ema


def test_storage_holds_trainable_parameters_and_all_buffers_only() -> None:
    model = make_model(0)
    model.fc1.weight.requires_grad_(False)
    _trainer, ema = trained_ema(model)
    assert "fc1.weight" not in ema.ema_tensors
    assert {"fc1.bias", "fc2.weight", "bn.running_mean", "bn.num_batches_tracked"} <= set(ema.ema_tensors)
    expected_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n != "fc1.weight")
    assert storage_bytes(ema) < expected_bytes + 64 * len(ema.ema_tensors)
    assert storage_bytes(ema) >= expected_bytes
    # the frozen parameter is shared, not copied, by ema_model
    assert ema.ema_model.fc1.weight.data_ptr() == model.fc1.weight.data_ptr()


def storage_bytes(ema: EMA) -> int:
    assert ema.storage is not None
    return ema.storage.nbytes


def test_integer_buffers_equal_the_models() -> None:
    trainer, ema = trained_ema()
    assert ema.ema_tensors["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(ema.ema_tensors["bn.num_batches_tracked"], trainer.state.model.bn.num_batches_tracked)
    assert ema.ema_tensors["bn.num_batches_tracked"].item() == 8


def test_fp32_average_for_bf16_model_and_opt_out() -> None:
    ema = EMA(half_life="2ba")
    Trainer(make_model(0).to(torch.bfloat16), make_loader(), "1ep", algorithms=[ema], progress_bar=False,
            loss_fn=lambda out, y: F.cross_entropy(out.float(), y))  # fmt: skip
    model = make_model(0).to(torch.bfloat16)
    for fp32, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        ema = EMA(half_life="2ba", fp32_ema=fp32)
        trainer = Trainer(
            copy.deepcopy(model),
            [(x.to(torch.bfloat16), y) for x, y in make_loader()],
            "1ep",
            algorithms=[ema],
            progress_bar=False,
        )
        trainer.fit()
        assert ema.ema_tensors["fc1.weight"].dtype == dtype
        assert ema.ema_tensors["bn.num_batches_tracked"].dtype == torch.int64


def test_ema_model_is_a_module_over_the_storage() -> None:
    trainer, ema = trained_ema()
    ema_model = ema.ema_model
    assert isinstance(ema_model, TinyNet)
    assert not ema_model.training
    assert set(ema_model.state_dict()) == set(trainer.state.model.state_dict())
    assert ema.storage is not None
    buffers = [b for b in ema.storage.buffers.values()]
    for name, tensor in ema_model.state_dict().items():
        owner = [b for b in buffers if b.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()]
        assert owner, f"{name} is a copy, not a view of the EMA storage"
    # callable, and equal to the training model loaded with the EMA weights
    reference = copy.deepcopy(trainer.state.model)
    reference.load_state_dict(ema.ema_tensors)
    reference.eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(ema_model(x), reference(x))
    assert ema.ema_model is ema_model  # built once, follows later updates through the views


def test_ema_model_before_start_says_when() -> None:
    ema = EMA(half_life="2ba", ema_start="5ba")
    Trainer(make_model(0), make_loader(), "1ep", algorithms=[ema], progress_bar=False)
    with pytest.raises(RuntimeError, match=r"has not started yet.*batch end.*ema_start='5ba'"):
        _ = ema.ema_model


def test_swap_round_trip_is_exact() -> None:
    trainer, ema = trained_ema()
    model = trainer.state.model
    before = copy.deepcopy(model.state_dict())
    assert ema.get_training_model(model) is model  # nothing to undo: no error
    assert ema.get_ema_model(model) is model
    assert ema.ema_weights_active
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema.ema_tensors[name].to(value.dtype)), name
    assert ema.get_ema_model(model) is model  # already there: no-op, no error
    ema.get_training_model(model)
    ema.get_training_model(model)
    assert not ema.ema_weights_active
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_get_ema_model_into_another_model_of_the_same_structure() -> None:
    _trainer, ema = trained_ema()
    other = make_model(5)
    ema.get_ema_model(other)
    for name, value in other.state_dict().items():
        assert torch.equal(value, ema.ema_tensors[name]), name
    ema.get_training_model(other)
    assert torch.equal(other.fc1.weight, make_model(5).fc1.weight)


def test_load_state_dict_from_another_model_names_the_tensor() -> None:
    _, ema = trained_ema()
    state = ema.state_dict()
    other = EMA(half_life="2ba")
    Trainer(TinyNet(d_in=5), make_loader(), "1ep", algorithms=[other], progress_bar=False)
    with pytest.raises(
        ValueError, match=r"EMA state: tensor 'fc1.weight' has shape \(8, 4\), the model's has \(8, 5\)"
    ):
        other.load_state_dict(state)
    # a parameter may be missing (frozen when that average started, see test_selection.py); a buffer may not
    missing = dict(state, ema={k: v for k, v in state["ema"].items() if k != "bn.running_mean"})
    with pytest.raises(ValueError, match=r"EMA state has no tensor 'bn.running_mean'"):
        ema.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"EMA state has no 'num_updates' entry"):
        ema.load_state_dict({"started": True, "start_count": 1, "ema": {}})


def test_state_dict_round_trip() -> None:
    _, ema = trained_ema()
    state = {
        k: (copy.deepcopy(v) if k != "ema" else {n: t.clone() for n, t in v.items()})
        for k, v in ema.state_dict().items()
    }
    fresh = EMA(half_life="2ba")
    Trainer(make_model(3), make_loader(), "1ep", algorithms=[fresh], progress_bar=False)
    fresh.load_state_dict(state)
    assert fresh.started and (fresh.n_averaged - 1) == (ema.n_averaged - 1) and fresh.start_count == ema.start_count
    for name, value in ema.ema_tensors.items():
        assert torch.equal(fresh.ema_tensors[name], value)


def test_two_averagers_of_one_kind_are_refused_naming_the_one_that_tracks_several() -> None:
    with pytest.raises(
        ValueError,
        match=r"one EMA per Trainer.*got algorithms EMA and EMA \(several EMAs in one pass: EMA\(half_life=\[\.\.\.\]\)\)",
    ):
        Trainer(make_model(0), make_loader(), "1ba", algorithms=[EMA(), EMA()], progress_bar=False)


def test_event_match_is_pure() -> None:
    ema = EMA(half_life="1ep")
    trainer = Trainer(make_model(0), make_loader(), "1ep", algorithms=[ema], progress_bar=False)
    algorithm = trainer.state.algorithms[0]
    assert isinstance(algorithm, Averaging) and algorithm.averager is ema
    assert not algorithm.match(Event.BATCH_END, trainer.state)
    assert algorithm.match(Event.EPOCH_END, trainer.state)
    assert not ema.started
