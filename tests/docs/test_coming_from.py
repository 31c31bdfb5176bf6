"""The argument mappings of docs/coming-from/*.md, run against the real libraries where they install here.

Each test drives one training run and, after every optimizer step, updates the other library's EMA and
emakit's with the mapped arguments from that page; the averages must agree update by update, to fp32
rounding (the libraries blend with ``lerp_`` or ``sub_``, emakit with ``lerp_``). Where emakit deliberately
differs (integer buffers, the time axis of ema-pytorch's post-hoc EMA), the test checks the difference the
page states. Libraries not installed are skipped with the reason; Composer cannot be installed beside torch
2.13 (it pins an older torch), so its page is tested against Composer's documented formula.

The peers install with ``pip install -e ".[peers]"`` (ema-pytorch, diffusers; timm with ``--no-deps``).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from docs._blocks import code_blocks
from emakit import EMA, compute_ema

STEPS = 12
PAGES = Path(__file__).resolve().parents[2] / "docs" / "coming-from"


def page_function(page: str, name: str) -> Callable[..., Any]:
    """The function ``name`` as a page's python block defines it (only the definition is run)."""
    for block in code_blocks(PAGES / page):
        for node in ast.parse(block.code).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                namespace: dict[str, Any] = {}
                exec(compile(ast.Module(body=[node], type_ignores=[]), f"{page}:{name}", "exec"), namespace)
                return namespace[name]  # type: ignore[no-any-return]
    raise AssertionError(f"{page} defines no {name}()")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def training(model: nn.Module, steps: int = STEPS) -> Iterator[int]:
    """Train ``model`` with SGD on seeded random batches, yielding the optimizer step count after each step."""
    generator = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    model.train()
    for step in range(1, steps + 1):
        x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        yield step


def floating(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if t.is_floating_point()}


def assert_same_average(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], where: str) -> None:
    assert sorted(ours) == sorted(theirs), where
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-6, atol=1e-7, msg=f"{where}: {name}")


def emakit_average(ema: EMA) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in ema.ema_tensors.items()}


# ------------------------------------------------------------------------------------------------ torch
def test_torch_averaged_model_maps_to_smoothing() -> None:
    """AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True) == EMA(smoothing=d)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    decay = 0.8
    model = make_model()
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema = EMA(smoothing=decay)
    ema.attach(model)
    for step in training(model):
        theirs.update_parameters(model)  # the first call copies
        ema.step()  # the first call copies
        assert_same_average(floating(emakit_average(ema)), floating(theirs.module.state_dict()), f"step {step}")
    # Integer buffers: torch averages and truncates them, emakit copies them (the page's "what changes").
    assert int(theirs.module[1].num_batches_tracked) < STEPS
    assert int(ema.ema_model[1].num_batches_tracked) == int(model[1].num_batches_tracked) == STEPS


def test_torch_use_buffers_false_copies_buffers() -> None:
    """use_buffers=False: torch copies the buffers each update; the page says emakit averages float buffers."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model()
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=False)
    ema = EMA(smoothing=0.8)
    ema.attach(model)
    for _ in training(model):
        theirs.update_parameters(model)
        ema.step()
    torch.testing.assert_close(theirs.module[1].running_mean, model[1].running_mean, rtol=0, atol=0)
    assert not torch.equal(ema.ema_model[1].running_mean, model[1].running_mean)
    params = {n: p for n, p in theirs.module.named_parameters()}
    assert_same_average({n: t for n, t in emakit_average(ema).items() if n in params}, params, "parameters")


# ------------------------------------------------------------------------------------------------- timm
def _timm_model_ema() -> Any:
    """timm's EMA module; loaded from its file when the package import fails for want of torchvision."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install timm --no-deps)")
    try:
        import timm.utils.model_ema as module

        return module
    except ImportError:  # the package imports torchvision; model_ema.py itself needs only torch
        path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
        file_spec = importlib.util.spec_from_file_location("_docs_timm_model_ema", path)
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module


def test_timm_model_ema_v3_without_step_is_compute_ema() -> None:
    """ModelEmaV3(model, decay=d) + update(model): compute_ema(model, ema_model, smoothing=d) on a copy made
    at the same moment (both blend from the initial weights, no start step)."""
    model_ema = _timm_model_ema()
    decay = 0.8
    model = make_model()
    theirs = model_ema.ModelEmaV3(model, decay=decay)
    ema_model = copy.deepcopy(model)
    for step in training(model):
        theirs.update(model)
        compute_ema(model, ema_model, smoothing=decay)
        assert_same_average(ema_model.state_dict(), theirs.module.state_dict(), f"step {step}")  # int buffers too


@pytest.mark.parametrize("update_after_step", [0, 4])
def test_timm_model_ema_v3_with_step_is_ema_start(update_after_step: int) -> None:
    """update(model, step=k) with update_after_step=a copies until step a+1: EMA(smoothing=d, ema_start='{a+1}ba')."""
    model_ema = _timm_model_ema()
    decay = 0.8
    model = make_model()
    theirs = model_ema.ModelEmaV3(model, decay=decay, update_after_step=update_after_step)
    ema = EMA(smoothing=decay, ema_start=f"{update_after_step + 1}ba")
    ema.attach(model)
    for step in training(model):
        theirs.update(model, step=step)
        ema.step()
        assert ema.started == (step >= update_after_step + 1)
        if ema.started:
            assert_same_average(emakit_average(ema), theirs.module.state_dict(), f"step {step}")


# --------------------------------------------------------------------------------------------- diffusers
def _ema_model_class() -> Any:
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[peers]')")
    from diffusers.training_utils import EMAModel

    return EMAModel


def _parameters(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    names = {name for name, _ in model.named_parameters()}
    return {name: t for name, t in state.items() if name in names}


@pytest.mark.parametrize("update_after_step", [0, 3])
def test_diffusers_constant_decay_is_smoothing(update_after_step: int) -> None:
    """EMAModel(params, decay=d, min_decay=d, update_after_step=a) == EMA(smoothing=d, ema_start='{a+1}ba')
    on the parameters (diffusers averages parameters only)."""
    EMAModel = _ema_model_class()
    decay = 0.8
    model = make_model()
    theirs = EMAModel(model.parameters(), decay=decay, min_decay=decay, update_after_step=update_after_step)
    ema = EMA(smoothing=decay, ema_start=f"{update_after_step + 1}ba")
    ema.attach(model)
    names = [name for name, _ in model.named_parameters()]
    for step in training(model):
        theirs.step(model.parameters())
        ema.step()
        if ema.started:
            shadow = dict(zip(names, theirs.shadow_params, strict=True))
            assert_same_average(_parameters(emakit_average(ema), model), shadow, f"step {step}")


def test_diffusers_default_warmup_is_compute_ema_with_the_schedule() -> None:
    EMAModel = _ema_model_class()
    diffusers_decay = page_function("diffusers.md", "diffusers_decay")
    model = make_model()
    theirs = EMAModel(model.parameters(), decay=0.9999)
    ema_model = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    for step in training(model):
        theirs.step(model.parameters())
        compute_ema(model, ema_model, smoothing=diffusers_decay(step, 0.9999))
        assert theirs.cur_decay_value == diffusers_decay(step, 0.9999)
        shadow = dict(zip(names, theirs.shadow_params, strict=True))
        assert_same_average(dict(ema_model.named_parameters()), shadow, f"step {step}")


# ------------------------------------------------------------------------------------------- ema-pytorch
def _ema_pytorch() -> Any:
    return pytest.importorskip("ema_pytorch", reason="ema-pytorch is not installed (pip install -e '.[peers]')")


def follow_ema_pytorch(model: nn.Module, theirs: Any, ema: EMA) -> None:
    """Train ``model``, updating ema-pytorch's ``theirs`` and emakit's ``ema``: the same floating averages each step."""
    ema.attach(model)
    for step in training(model):
        theirs.update()
        ema.step()
        if ema.started:
            assert_same_average(floating(emakit_average(ema)), floating(theirs.ema_model.state_dict()), f"step {step}")


@pytest.mark.parametrize("update_after_step", [0, 3])
def test_ema_pytorch_constant_beta_is_smoothing(update_after_step: int) -> None:
    """EMA(model, beta=d, update_every=1, update_after_step=a, min_value=d) == EMA(smoothing=d, ema_start='{a+1}ba')."""
    ema_pytorch = _ema_pytorch()
    decay = 0.8
    model = make_model()
    theirs = ema_pytorch.EMA(
        model, beta=decay, update_every=1, update_after_step=update_after_step, min_value=decay,
        include_online_model=False,
    )  # fmt: skip
    ema = EMA(smoothing=decay, ema_start=f"{update_after_step + 1}ba")
    follow_ema_pytorch(model, theirs, ema)
    # ema-pytorch never touches integer buffers (they keep the value of its deepcopy); emakit copies them.
    assert int(ema.ema_model[1].num_batches_tracked) == STEPS
    assert int(theirs.ema_model[1].num_batches_tracked) == 0


def test_ema_pytorch_default_schedule_is_compute_ema_with_the_schedule() -> None:
    """The defaults' warm-up and update_every (here 3, after 4 steps) reproduced with compute_ema."""
    ema_pytorch = _ema_pytorch()
    ema_pytorch_decay = page_function("ema-pytorch.md", "ema_pytorch_decay")
    model = make_model()
    theirs = ema_pytorch.EMA(model, beta=0.9999, update_after_step=4, update_every=3, include_online_model=False)
    ema_model = copy.deepcopy(model)
    for step in training(model, steps=20):
        theirs.update()
        smoothing = ema_pytorch_decay(step, 0.9999, update_after_step=4, update_every=3)
        if smoothing is not None:
            compute_ema(model, ema_model, smoothing=smoothing)
        assert_same_average(floating(ema_model.state_dict()), floating(theirs.ema_model.state_dict()), f"call {step}")


@pytest.mark.parametrize(("update_after_step", "gamma", "power"), [(0, 1.0, 2 / 3), (3, 2.0, 0.75)])
def test_ema_pytorch_warmup_is_emakits_warmup(update_after_step: int, gamma: float, power: float) -> None:
    """EMA(model, beta=d, update_every=1, update_after_step=a, inv_gamma=g, power=p) ==
    EMA(smoothing=d, ema_start='{a+1}ba', warmup=Warmup(gamma=g, power=p)), as ema-pytorch.md maps it."""
    from emakit.averaging import Warmup

    ema_pytorch = _ema_pytorch()
    model = make_model()
    theirs = ema_pytorch.EMA(
        model, beta=0.999, update_every=1, update_after_step=update_after_step, inv_gamma=gamma, power=power,
        include_online_model=False,
    )  # fmt: skip
    ema = EMA(smoothing=0.999, ema_start=f"{update_after_step + 1}ba", warmup=Warmup(gamma=gamma, power=power))
    follow_ema_pytorch(model, theirs, ema)


def test_no_page_says_emakit_has_no_warmup() -> None:
    for page in sorted(PAGES.glob("*.md")):
        text = " ".join(page.read_text().split())
        assert "no warm-up" not in text and "no decay warm-up" not in text, page.name


def test_ema_pytorch_post_hoc_ema_counts_its_first_update_twice(tmp_path: Path) -> None:
    """PostHocEMA(sigma_rels=...) tracks the same power averages as EMA(sigma_rel=...), with its time axis one
    update ahead: its first update copies and then blends the copy with itself. emakit fed the first weights
    twice gives the same averages, update by update."""
    ema_pytorch = _ema_pytorch()
    from emakit.posthoc import sigma_rel_to_gamma

    sigma_rels = (0.05, 0.15)
    model = make_model()
    theirs = ema_pytorch.PostHocEMA(
        model, sigma_rels=sigma_rels, update_every=1, checkpoint_every_num_steps="manual",
        checkpoint_folder=str(tmp_path),
    )  # fmt: skip
    for sigma_rel, gamma in zip(sigma_rels, theirs.gammas, strict=True):
        assert math.isclose(sigma_rel_to_gamma(sigma_rel), gamma, rel_tol=1e-9)
    ema = EMA(sigma_rel=list(sigma_rels))
    ema.attach(model)
    for step in training(model):
        theirs.update()
        ema.step()
        if step == 1:
            ema.step()  # the same weights again: emakit's t = 2 is ema-pytorch's first update
        for index, karras in enumerate(theirs.ema_models):
            ema.eval_average = index
            assert_same_average(
                floating(emakit_average(ema)), floating(karras.ema_model.state_dict()), f"step {step}, {index}"
            )


# --------------------------------------------------------------------------------------------- Lightning
def _lightning_run(callback: Any, record: Callable[[], dict[str, torch.Tensor] | None]) -> list[Any]:
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install -e '.[lightning]')")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.3)

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def on_train_batch_end(self, *args: Any) -> None:
            state = record()
            self.seen.append(None if state is None else {n: t.clone() for n, t in state.items()})

    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(96, 4, generator=generator), torch.randint(0, 3, (96,), generator=generator))
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[callback, recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Module(), train_dataloaders=DataLoader(data, batch_size=16))
    return recorder.seen


@pytest.mark.parametrize("start", [None, 3])
def test_lightning_ema_weight_averaging_maps_to_ema_callback(start: int | None) -> None:
    """EMAWeightAveraging(decay=d, update_starting_at_step=s) == EMACallback(smoothing=d, ema_start='{s+1}ba')."""
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from emakit.integrations.lightning import EMACallback

    decay = 0.8
    theirs_cb = EMAWeightAveraging(decay=decay, update_starting_at_step=start)

    def theirs_state() -> dict[str, torch.Tensor] | None:
        averaged = theirs_cb._average_model
        return None if averaged is None or int(averaged.n_averaged) == 0 else averaged.module.state_dict()

    ours_cb = EMACallback(smoothing=decay, ema_start=f"{(start or 0) + 1}ba")

    def ours_state() -> dict[str, torch.Tensor] | None:
        return ours_cb.averager.ema_tensors if ours_cb.averager.started else None

    theirs = _lightning_run(theirs_cb, theirs_state)
    ours = _lightning_run(ours_cb, ours_state)
    assert len(theirs) == len(ours) == 12
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert (a is None) == (b is None) == (step < (start or 0) + 1), step
        if a is not None:
            assert_same_average(floating(a), floating(b), f"step {step}")


# ---------------------------------------------------------------------------------------------- Composer
def composer_smoothing(half_life: float, update_interval: float) -> float:
    """Composer's EMA documents smoothing = exp(-ln(2) * update_interval / half_life) (same units)."""
    return math.exp(-math.log(2) * update_interval / half_life)


@pytest.mark.parametrize(("half_life", "update_interval"), [(1000, 1), (50, 5), (3, 1), (2, 2)])
def test_composer_names_and_formula(half_life: int, update_interval: int) -> None:
    ema = EMA(half_life=f"{half_life}ba", update_interval=f"{update_interval}ba")
    assert math.isclose(ema.schedule.smoothing, composer_smoothing(half_life, update_interval), rel_tol=1e-12)
    ema_ep = EMA(half_life=f"{half_life}ep", update_interval=f"{update_interval}ep")
    assert math.isclose(ema_ep.schedule.smoothing, composer_smoothing(half_life, update_interval), rel_tol=1e-12)


def test_composer_schedule_closed_form() -> None:
    """Composer's EMA starts as a copy at ema_start and blends at every multiple of update_interval: after it,
    the average equals the closed form over the recorded weights."""
    model = make_model()
    ema = EMA(half_life="4ba", update_interval="2ba", ema_start="3ba")
    ema.attach(model)
    s = composer_smoothing(4, 2)
    expected: dict[str, torch.Tensor] | None = None
    for step in training(model):
        ema.step()
        weights = floating({n: t.detach().clone() for n, t in model.state_dict().items()})
        if step == 3:
            expected = weights
        elif expected is not None and step % 2 == 0:
            expected = {n: s * expected[n] + (1 - s) * w for n, w in weights.items()}
    assert expected is not None
    assert_same_average(floating(emakit_average(ema)), expected, "end")


# ------------------------------------------------------------------------------------ per-step -> half-life
@pytest.mark.parametrize("decay", [0.999, 0.9999])
@pytest.mark.parametrize("every", [1, 10])
def test_per_step_decay_to_half_life(decay: float, every: int) -> None:
    """The page's formula: a per-update decay d every k steps is half_life = -k / log2(d) steps; emakit keeps
    that half-life when update_interval changes (the per-update smoothing changes with it)."""
    half_life = round(-every / math.log2(decay))
    ema = EMA(half_life=f"{half_life}ba", update_interval=f"{every}ba")
    assert math.isclose(ema.schedule.smoothing, decay, rel_tol=0, abs_tol=1e-6)
    doubled = EMA(half_life=f"{half_life}ba", update_interval=f"{2 * every}ba")
    assert math.isclose(doubled.schedule.smoothing, ema.schedule.smoothing**2, rel_tol=1e-12)
