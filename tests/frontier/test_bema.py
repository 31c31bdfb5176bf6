"""BEMA: update by update against the paper's formula (float64 oracle) and TRL's BEMACallback, resume, selection,
and the corrected weights wherever the average is used (swap, ema_model, published and exported states)."""

from __future__ import annotations

import copy

import pytest
import torch
from _oracle import bema_oracle, corrected, max_error, record, tiny_model, train
from torch import nn

from emakit import BEMA


@pytest.mark.parametrize(("start", "every"), [(0, 1), (4, 2), (3, 3)])
def test_each_step_follows_the_papers_formula_in_float64(start: int, every: int) -> None:
    bema = BEMA(rho=5.0, gamma=1.5, kappa=0.6, eta=0.3, update_interval=f"{every}ba", bema_start=f"{start}ba")
    model = tiny_model()
    bema.attach(model)
    errors = []
    recorded = [record(model)]
    for step in range(1, 25):
        train(bema, 1, model=model, start=step - 1)
        recorded.append(record(model))
        if step >= max(start, 1):
            expected = bema_oracle(recorded, 5.0, 1.5, 0.6, 0.3, max(start, 1), every)[step]
            assert expected is not None
            errors.append(max_error(bema.ema_tensors, corrected(expected, recorded[step])))
    print(f"BEMA start={start} every={every}: max |evaluated - oracle| over {len(errors)} steps = {max(errors):.2e}")
    assert len(errors) == 25 - max(start, 1) and max(errors) < 2e-6


def test_between_updates_the_correction_uses_the_training_weights_of_now() -> None:
    bema = BEMA(update_interval="4ba", rho=3.0)
    _, recorded = train(bema, 6)  # start at 1, update at 4, then steps 5 and 6
    expected = bema_oracle(recorded, 3.0, 1.0, 0.5, 0.2, 1, 4)[6]
    assert expected is not None
    assert max_error(bema.ema_tensors, corrected(expected, recorded[6])) < 1e-6


def test_update_by_update_equal_to_trls_bema_callback() -> None:
    callbacks = pytest.importorskip("trl.trainer.callbacks")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tau, phi, lag, multiplier = 4, 2, 10, 1.0
    trl = callbacks.BEMACallback(update_freq=phi, update_after=tau, lag=lag, multiplier=multiplier)
    args, state, control = object(), transformers.TrainerState(), transformers.TrainerControl()
    trl.on_train_begin(args, state, control, model=model)
    # TRL's t is the global step; emakit's counts from the start: the same rho + gamma * t with rho + gamma * tau
    bema = BEMA(rho=lag + multiplier * tau, gamma=multiplier, update_interval=f"{phi}ba", bema_start=f"{tau}ba")
    bema.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compared, worst = 0, 0.0
    for step in range(1, 21):
        ids = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        trl.on_step_end(args, state, control, model=model)
        bema.step()
        if step > tau and (step - tau) % phi == 0:  # TRL's running model is refreshed at its updates
            ours = bema.ema_tensors
            for name, theirs in trl.running_model.named_parameters():
                worst = max(worst, (ours[name] - theirs).abs().max().item())
            compared += 1
    print(f"BEMA vs TRL BEMACallback: {compared} updates, max |difference| = {worst:.2e}")
    assert compared == 8 and worst < 1e-6


def test_resume_mid_run_is_bitwise() -> None:
    kwargs = {"update_interval": "2ba", "bema_start": "2ba"}
    bema = BEMA(**kwargs)
    model, _ = train(bema, 7)
    saved, saved_model = copy.deepcopy(bema.state_dict()), copy.deepcopy(model)
    assert set(saved["theta_0"]) == {n for n, _ in model.named_parameters()}
    train(bema, 8, model=model, start=7)
    resumed = BEMA(**kwargs)
    resumed.attach(saved_model)
    resumed.load_state_dict(saved)
    train(resumed, 8, model=saved_model, start=7)
    assert resumed.n_averaged == bema.n_averaged
    for name, tensor in bema.ema_tensors.items():
        assert torch.equal(tensor, resumed.ema_tensors[name]), name


def test_a_state_without_theta_0_is_refused_naming_it() -> None:
    bema = BEMA(update_interval="1ba")
    model, _ = train(bema, 3)
    state = bema.state_dict()
    del state["theta_0"]
    other = BEMA(update_interval="1ba")
    other.attach(copy.deepcopy(model))
    with pytest.raises(ValueError, match="holds no 'theta_0'"):
        other.load_state_dict(state)


def test_selection_keeps_theta_0_of_the_selected_tensors_in_the_models_dtype() -> None:
    model = tiny_model().to(torch.bfloat16)
    bema = BEMA(update_interval="1ba", params=["2.*"])  # an adapter-like subset: the last layer only
    bema.attach(model)
    with torch.no_grad():
        bema.step()
    correction = bema._rule.correction
    assert correction is not None and correction.theta_0 is not None
    assert correction.theta_0.names == ["2.weight", "2.bias"]
    assert {t.dtype for t in correction.theta_0.views()} == {torch.bfloat16}
    parameters = sum(p.numel() for n, p in model.named_parameters() if n.startswith("2."))
    assert correction.nbytes == pytest.approx(2 * parameters, abs=2 * 64)  # 2 bytes per parameter (+ alignment)


def test_swap_ema_model_and_published_state_give_the_corrected_weights() -> None:
    bema = BEMA(update_interval="2ba", rho=2.0)
    model, recorded = train(bema, 6)
    expected = corrected(bema_oracle(recorded, 2.0, 1.0, 0.5, 0.2, 1, 2)[6], recorded[6])  # type: ignore[arg-type]
    with bema.average_parameters(model):
        assert max_error(dict(model.named_parameters()), expected) < 1e-6
    assert max_error(dict(bema.ema_model.named_parameters()), expected) < 1e-6
    published = {k: v.clone() for k, v in bema.published_model_state(model.state_dict()).items()}
    assert max_error(published, expected) < 1e-6
    assert torch.equal(model[0].weight.detach().to(torch.float64), recorded[6]["0.weight"])  # training weights back
    train(bema, 1, model=model, start=6)  # the training weights move: ema_model follows when read again
    assert not torch.equal(bema.ema_model[0].weight, published["0.weight"])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"kappa must be a finite number of 0 or more, got -1"):
        BEMA(kappa=-1)
    with pytest.raises(ValueError, match=r"rho \+ gamma \* update_interval must be 1 or more"):
        BEMA(rho=0.0, gamma=0.1, update_interval="1ba")
    with pytest.raises(ValueError, match=r"update_interval: got '1sp'; accepted units: 'ba', 'ep'"):
        BEMA(update_interval="1sp")
    with pytest.raises(ValueError, match=r"bema_start cannot be negative"):
        BEMA(bema_start="-1ba")
    assert isinstance(BEMA(), nn.Module) is False


def test_update_bn_is_refused_and_a_copy_of_ema_model_takes_torchs_update_bn() -> None:
    """BEMA's evaluated weights are rebuilt from the average and the training weights at every read, so statistics
    recomputed into them would be lost at the next read (they were, silently): update_bn refuses, naming the way
    that works, which gives the statistics torch's update_bn measures on the corrected weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    bema = BEMA(update_interval="1ba")
    bema.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for x in data:
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        bema.step()
    with pytest.raises(ValueError, match=r"BEMA: update_bn cannot keep BatchNorm statistics .* copy\.deepcopy\(bema"):
        bema.update_bn([(x,) for x in data])
    assert bema.finish_window([(x,) for x in data], end_of_training=True) is False  # bn_update is off for BEMA

    evaluated = copy.deepcopy(bema.ema_model)
    torch.optim.swa_utils.update_bn([(x,) for x in data], evaluated)
    # by hand: the corrected weights' first layer, then the equal-weight mean of the batch statistics
    w, b = bema.ema_tensors["0.weight"].double(), bema.ema_tensors["0.bias"].double()
    hidden = [x.double() @ w.T + b for x in data]
    mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    var = torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    assert torch.allclose(evaluated[1].running_mean.double(), mean, atol=1e-6)
    assert torch.allclose(evaluated[1].running_var.double(), var, atol=1e-5)
