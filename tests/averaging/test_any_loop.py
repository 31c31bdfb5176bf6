"""The EMA in a hand-written loop: attach, step after each optimizer step, evaluate inside
``average_parameters``, save and restore with ``state_dict``. Checked against a naive reference loop."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_loader, make_model
from emakit import EMA, export_ema_weights
from emakit.averaging import EMA as TrainerFreeEMA


def train(model: nn.Module, ema: EMA | None, steps: int, seed: int = 0, record: list | None = None) -> None:
    """SGD with momentum on a fixed stream of batches; ``record`` gets the state_dict after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(model, opt, ema, range(steps), seed, record)


def run(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None, steps: range, seed: int, record: list | None):
    loader = list(make_loader(n=8 * 20, seed=seed))
    for i in steps:
        x, y = loader[i % len(loader)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if record is not None:
            record.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if ema is not None:
            ema.step(num_samples=len(x))


def reference(records: list[dict[str, torch.Tensor]], smoothing: float, start: int, interval: int) -> dict:
    """The average by hand: a copy at optimizer step ``start``, then a blend at every multiple of ``interval``."""
    average: dict[str, torch.Tensor] = {}
    for step, weights in enumerate(records, start=1):
        if step == start:
            average = {k: v.double() if v.is_floating_point() else v.clone() for k, v in weights.items()}
        elif step > start and step % interval == 0:
            for k, v in weights.items():
                if v.is_floating_point():
                    average[k] = smoothing * average[k] + (1 - smoothing) * v.double()
                else:
                    average[k] = v.clone()  # integer buffers are copied
    return average


def test_the_loop_matches_a_reference_computed_from_the_recorded_weights() -> None:
    model = make_model(0)
    ema = EMA(half_life="4ba", ema_start="3ba", update_interval="2ba")
    ema.attach(model)
    records: list[dict[str, torch.Tensor]] = []
    train(model, ema, 12, record=records)
    expected = reference(records, 2 ** (-2 / 4), start=3, interval=2)
    assert ema.started and (ema.n_averaged - 1) == 5  # steps 4, 6, 8, 10, 12
    assert ema.timestamp.batch == 12 and ema.timestamp.sample == 12 * 8
    for name, value in ema.ema_tensors.items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, records[-1][name]) and torch.equal(value, expected[name])


def test_step_reports_when_the_average_changed() -> None:
    model = make_model(0)
    ema = EMA(smoothing=0.5, ema_start="2ba", update_interval="2ba")
    ema.attach(model)
    assert [ema.step() for _ in range(6)] == [False, True, False, True, False, True]


def test_epoch_units_start_and_blend_at_epoch_end() -> None:
    model = make_model(0)
    ema = EMA(half_life="1ep", ema_start="1ep")
    ema.attach(model)
    train(model, ema, 3)
    assert not ema.started
    assert ema.epoch_end() and ema.started and (ema.n_averaged - 1) == 0
    before = {k: v.clone() for k, v in ema.ema_tensors.items()}
    train(model, ema, 3)
    assert ema.epoch_end() and (ema.n_averaged - 1) == 1
    weights = model.state_dict()
    for name, value in ema.ema_tensors.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * weights[name])


def test_duration_fractions_need_the_length_and_name_what_is_missing() -> None:
    ema = EMA(half_life="2ba", ema_start="0.5dur")
    ema.attach(make_model(0))
    with pytest.raises(ValueError, match=r"ema_start='0.5dur' is a fraction of the training length.*max_duration"):
        ema.step()
    ema = EMA(half_life="2ba", ema_start="0.5dur")
    model = make_model(0)
    ema.attach(model, max_duration="10ba")
    started_at = next(i for i in range(1, 11) if ema.step())
    assert started_at == 5 and ema.start_count == 5
    late = EMA(half_life="2ba", ema_start="0.5dur")
    late.attach(make_model(0))
    late.set_duration("2ep", batches_per_epoch=4)
    assert [late.step() for _ in range(4)] == [False, False, False, True]  # half of 8 batches


def test_the_default_start_needs_no_length() -> None:
    ema = EMA(half_life="2ba")
    ema.attach(make_model(0))
    assert ema.step() and ema.started


def test_step_before_attach_and_bad_durations_are_named() -> None:
    with pytest.raises(RuntimeError, match=r"call ema.attach\(model\) before the first ema.step\(\)"):
        EMA().step()
    ema = EMA(ema_start="20ba")
    with pytest.raises(ValueError, match=r"ema_start='20ba' is after max_duration='10ba'"):
        ema.attach(make_model(0), max_duration="10ba")
    with pytest.raises(ValueError, match=r"max_duration: got '0.5dur'; accepted units"):
        EMA().set_duration("0.5dur")
    with pytest.raises(ValueError, match=r"batches_per_epoch must be a non-negative int or None, got -1"):
        EMA().set_duration(None, batches_per_epoch=-1)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        EMA().attach("model")  # type: ignore[arg-type]


def test_average_parameters_swaps_in_and_always_back() -> None:
    model = make_model(0)
    ema = EMA(half_life="2ba")
    ema.attach(model)
    train(model, ema, 5)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters() as inside:
        assert inside is model
        for name, value in model.state_dict().items():
            assert torch.equal(value, ema.ema_tensors[name].to(value.dtype))
    for name, value in model.state_dict().items():
        assert torch.equal(value, training[name])
    with pytest.raises(ZeroDivisionError), ema.average_parameters():
        _ = 1 / 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, training[name])
    assert not ema.ema_weights_active


def test_average_parameters_before_the_start_keeps_the_training_weights() -> None:
    model = make_model(0)
    ema = EMA(half_life="2ba", ema_start="100ba")
    ema.attach(model)
    train(model, ema, 2)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters():
        for name, value in model.state_dict().items():
            assert torch.equal(value, training[name])


def test_state_dict_resumes_exactly(tmp_path: Path) -> None:
    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
        model = make_model(0)
        ema = EMA(half_life="3ba", ema_start="2ba", update_interval="2ba")
        ema.attach(model)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), ema

    model, opt, ema = fresh()
    run(model, opt, ema, range(11), 0, None)

    first, opt1, ema1 = fresh()
    run(first, opt1, ema1, range(5), 0, None)
    path = tmp_path / "ck.pt"
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "ema": ema1.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    second, opt2, ema2 = fresh()
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    ema2.load_state_dict(saved["ema"])
    assert ema2.timestamp == ema1.timestamp and (ema2.n_averaged - 1) == (ema1.n_averaged - 1)
    run(second, opt2, ema2, range(5, 11), 0, None)

    assert (ema2.n_averaged - 1) == (ema.n_averaged - 1) and ema2.timestamp == ema.timestamp
    for name, value in ema.ema_tensors.items():
        assert torch.equal(ema2.ema_tensors[name], value), name
    for name, value in model.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name


def test_load_state_dict_before_attach_is_refused() -> None:
    model = make_model(0)
    ema = EMA(half_life="2ba")
    ema.attach(model)
    ema.step()
    with pytest.raises(RuntimeError, match=r"attach the EMA to its model"):
        EMA(half_life="2ba").load_state_dict(ema.state_dict())


def test_export_writes_safetensors_and_torch_files(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = make_model(0)
    ema = EMA(half_life="2ba")
    ema.attach(model)
    train(model, ema, 4)
    expected = ema.ema_model.state_dict()
    for path, load in (
        (tmp_path / "ema.safetensors", lambda p: load_file(str(p))),
        (tmp_path / "ema.pt", lambda p: torch.load(p, weights_only=True)),
    ):
        assert export_ema_weights(ema, path) == path
        plain = make_model(1)
        plain.load_state_dict(load(path))
        for name, value in expected.items():
            assert torch.equal(plain.state_dict()[name], value), (path, name)


def test_the_trainer_free_class_is_the_base_of_the_trainer_one() -> None:
    assert issubclass(EMA, TrainerFreeEMA)
    assert "emakit.core" not in TrainerFreeEMA.__module__


def test_an_update_interval_longer_than_the_half_life_warns() -> None:
    with pytest.warns(UserWarning, match=r"update_interval='10ba' is longer than half_life='2ba'.*barely smooths"):
        ema = EMA(half_life="2ba", update_interval="10ba")
    assert math.isclose(ema.schedule.smoothing, 2**-5)


# ---------------------------------------------------------------- low-precision models
def test_a_bf16_model_gets_a_bf16_ema_model_and_keeps_an_fp32_master(tmp_path: Path) -> None:
    model = make_model(0).to(torch.bfloat16)
    ema = EMA(half_life="2ba")
    ema.attach(model)
    data = [(torch.randn(8, 4, dtype=torch.bfloat16), torch.randint(0, 3, (8,))) for _ in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        ema.step()
    ema_model = ema.ema_model
    assert ema_model.fc1.weight.dtype == torch.bfloat16
    assert ema.ema_tensors["fc1.weight"].dtype == torch.float32  # the master
    assert ema_model(data[0][0]).dtype == torch.bfloat16  # runs on the model's inputs
    torch.testing.assert_close(ema_model.fc1.weight, ema.ema_tensors["fc1.weight"].to(torch.bfloat16), rtol=0, atol=0)
    # it follows the average: read again after more updates
    before = ema_model.fc1.weight.clone()
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        ema.step()
    assert not torch.equal(ema.ema_model.fc1.weight, before)
    assert torch.equal(ema.ema_model.fc1.weight, ema.ema_tensors["fc1.weight"].to(torch.bfloat16))
    state = ema.state_dict()
    assert state["ema"]["fc1.weight"].dtype == torch.float32
    published = ema.published_model_state(model.state_dict())
    assert published["fc1.weight"].dtype == torch.bfloat16
    path = export_ema_weights(ema, tmp_path / "ema.pt")
    assert path is not None
    assert torch.load(path, weights_only=True)["fc1.weight"].dtype == torch.bfloat16


def test_a_published_trainer_checkpoint_of_a_bf16_model_holds_bf16_weights_and_resumes_from_fp32(
    tmp_path: Path,
) -> None:
    from emakit import Trainer

    class Bf16Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(make_model(0)).to(torch.bfloat16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.to(torch.bfloat16)).float()

    ema = EMA(half_life="2ba")
    trainer = Trainer(Bf16Net(), make_loader(), "1ep", algorithms=[ema], save_folder=tmp_path, progress_bar=False)
    trainer.fit()
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert saved["state"]["model"]["net.fc1.weight"].dtype == torch.bfloat16
    assert torch.equal(saved["state"]["model"]["net.fc1.weight"], ema.ema_model.net.fc1.weight)
    assert saved["state"]["algorithms"]["EMA"]["ema"]["net.fc1.weight"].dtype == torch.float32
    resumed_ema = EMA(half_life="2ba")
    Trainer(
        Bf16Net(), make_loader(), "1ep", algorithms=[resumed_ema], load_path=tmp_path / "latest.pt", progress_bar=False
    )
    assert torch.equal(resumed_ema.ema_tensors["net.fc1.weight"], ema.ema_tensors["net.fc1.weight"])


class Tied(nn.Module):
    """An embedding whose weight is also the output layer's (as in GPT-2): one tensor, two state_dict keys."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(dim=1))


def test_tied_weights_are_published_and_restored_under_every_name(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from emakit import Trainer

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 7, (32, 3), generator=g), torch.randint(0, 7, (32,), generator=g))
    ema = EMA(half_life="2ba")
    trainer = Trainer(Tied(), DataLoader(data, batch_size=8), "1ep", algorithms=[ema], save_folder=tmp_path,
                      progress_bar=False)  # fmt: skip
    trainer.fit()
    average = ema.ema_tensors["embed.weight"]
    exported = torch.load(export_ema_weights(ema, tmp_path / "ema.pt"), weights_only=True)  # type: ignore[arg-type]
    plain = Tied()
    plain.load_state_dict(exported)  # both keys must carry the average, whichever is copied last
    assert torch.equal(plain.head.weight, average) and torch.equal(plain.embed.weight, average)
    training = trainer.state.model.embed.weight.detach().clone()
    resumed = Trainer(Tied(), DataLoader(data, batch_size=8), "1ep", algorithms=[EMA(half_life="2ba")],
                      load_path=tmp_path / "latest.pt", progress_bar=False)  # fmt: skip
    assert torch.equal(resumed.state.model.embed.weight, training)  # the training weights, not the average


def test_a_replaced_submodule_is_followed() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    ema = EMA(smoothing=0.5)
    ema.attach(model)
    ema.step()
    before = {k: v.clone() for k, v in ema.ema_tensors.items()}
    torch.manual_seed(5)
    model[2] = nn.Linear(4, 3)  # a new module object under the same name
    ema.step()
    new = model[2].weight.detach()
    torch.testing.assert_close(ema.ema_tensors["2.weight"], 0.5 * before["2.weight"] + 0.5 * new)
