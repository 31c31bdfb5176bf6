"""EMA(overlap=True): the parameters' update runs alongside the next step and gives the synchronous result."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import TinyNet, make_loader, make_model
from emakit import EMA
from emakit.checkpoint import load_checkpoint_file
from emakit.core import Callback
from emakit.engine.overlap import Overlap, StreamOverlap, ThreadOverlap, make_overlap
from emakit.trainer import Trainer


class DeferredOverlap(Overlap):
    """Runs the work only when waited for: any reader that forgets to wait sees the average one update
    behind, and an optimizer step that does not wait changes the weights before the work reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.work: Callable[[], None] | None = None
        self.launched = 0
        self.finished = 0

    def _start(self, work: Callable[[], None]) -> None:
        self.work = work
        self.launched += 1

    def _finish(self) -> None:
        assert self.work is not None
        work, self.work = self.work, None
        work()
        self.finished += 1


class Snapshots(Callback):
    """Clones of what other code would read from the EMA at each batch: its tensors and its state."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.seen: list[dict[str, torch.Tensor]] = []

    def batch_checkpoint(self, state: Any, logger: Any) -> None:
        if self.ema.started and state.timestamp.batch % 3 == 0:
            self.seen.append({n: t.clone() for n, t in self.ema.ema_tensors.items()})
        if self.ema.started and state.timestamp.batch % 5 == 0:
            self.seen.append({n: t.clone() for n, t in self.ema.state_dict()["ema"].items()})


def train(
    tmp_path: Path,
    overlap: bool,
    *,
    deferred: bool = False,
    flatten: bool = False,
    optimizer: str = "sgd",
    model: nn.Module | None = None,
) -> tuple[Trainer, EMA, Snapshots]:
    """Three epochs of 8 batches with eval every 4 batches and a checkpoint every 6: every reader of the
    EMA and every writer of the weights runs between an update and the next optimizer step."""
    model = make_model(0) if model is None else model
    ema = EMA(half_life="4ba", ema_start="3ba", overlap=overlap, flatten_model=flatten)
    snapshots = Snapshots(ema)
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(n=64, shuffle=True),
        eval_dataloader=make_loader(n=32, seed=1),
        eval_interval="4ba",
        max_duration="3ep",
        algorithms=[ema],
        callbacks=[snapshots],
        optimizers=opt,
        save_folder=str(tmp_path / ("on" if overlap else "off")),
        save_interval="6ba",
        progress_bar=False,
        seed=0,
    )
    if deferred:
        ema._averages.overlap = DeferredOverlap()
    trainer.fit()
    return trainer, ema, snapshots


def assert_same_run(a: tuple[Trainer, EMA, Snapshots], b: tuple[Trainer, EMA, Snapshots]) -> None:
    (ta, ea, sa), (tb, eb, sb) = a, b
    for (name, x), (_, y) in zip(ta.state.model.state_dict().items(), tb.state.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), f"training weights differ at {name}"
    for name, x in ea.ema_tensors.items():
        assert torch.equal(x, eb.ema_tensors[name]), f"EMA differs at {name}"
    assert len(sa.seen) == len(sb.seen) > 0
    for seen_a, seen_b in zip(sa.seen, sb.seen, strict=True):
        for name, x in seen_a.items():
            assert torch.equal(x, seen_b[name]), f"a mid-run read of the EMA differs at {name}"
    evals_a = [h for h in ta.metrics.history if "eval/loss" in h]
    evals_b = [h for h in tb.metrics.history if "eval/loss" in h]
    assert evals_a == evals_b and len(evals_a) == 6
    assert (ea.n_averaged - 1) == (eb.n_averaged - 1) > 0


def checkpoint_models(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_checkpoint_file(p)["state"]["model"] for p in sorted(folder.glob("ep*-ba*.pt"))}


@pytest.mark.parametrize("flatten", [False, True])
def test_worker_thread_gives_the_synchronous_run(tmp_path: Path, flatten: bool) -> None:
    sync = train(tmp_path, overlap=False, flatten=flatten)
    overlapped = train(tmp_path, overlap=True, flatten=flatten)
    assert isinstance(overlapped[1]._averages.overlap, ThreadOverlap)
    assert_same_run(overlapped, sync)
    on, off = checkpoint_models(tmp_path / "on"), checkpoint_models(tmp_path / "off")
    assert list(on) == list(off) and len(on) >= 4
    for name in on:
        for key, value in on[name].items():
            assert torch.equal(value, off[name][key]), f"{name}: {key}"


@pytest.mark.parametrize(("flatten", "optimizer"), [(False, "sgd"), (True, "sgd"), (False, "adamw")])
def test_every_reader_and_writer_waits(tmp_path: Path, flatten: bool, optimizer: str) -> None:
    """With the work deferred until someone waits, a missing wait is a wrong value, not a rare race."""
    sync = train(tmp_path, overlap=False, flatten=flatten, optimizer=optimizer)
    deferred = train(tmp_path, overlap=True, deferred=True, flatten=flatten, optimizer=optimizer)
    overlap = deferred[1]._averages.overlap
    assert isinstance(overlap, DeferredOverlap)
    assert overlap.launched == (deferred[1].n_averaged - 1) == overlap.finished  # fit() ends with nothing pending
    assert_same_run(deferred, sync)


def started_with_deferred_overlap() -> tuple[TinyNet, EMA, DeferredOverlap]:
    """A started EMA(smoothing=0.5, overlap=True) of a TinyNet whose overlapped work waits to be waited for."""
    model = make_model(0)
    ema = EMA(smoothing=0.5, overlap=True)
    ema.attach(model)
    deferred = DeferredOverlap()
    ema._averages.overlap = deferred
    ema._initialise(0)
    return model, ema, deferred


def test_buffers_are_blended_before_the_next_forward() -> None:
    """BatchNorm's forward writes its running statistics: the EMA must have read them already."""
    model, ema, _ = started_with_deferred_overlap()
    before = {n: t.clone() for n, t in ema.ema_tensors.items()}
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected_buffers = {n: b.clone() for n, b in model.named_buffers()}
    ema.update()
    model(torch.randn(8, 4))  # the next forward: new running statistics
    stored = ema._averages.storages[0].tensors  # type: ignore[index]
    for name, value in expected_buffers.items():
        want = value if not value.is_floating_point() else before[name].lerp(value, 0.5)
        assert torch.equal(stored[name], want), name
    assert torch.equal(stored["fc1.weight"], before["fc1.weight"])  # parameters: still pending
    ema.wait()
    params = dict(model.named_parameters())
    assert torch.equal(stored["fc1.weight"], before["fc1.weight"].lerp(params["fc1.weight"], 0.5))


def test_optimizer_step_waits_for_the_pending_update() -> None:
    model, ema, deferred = started_with_deferred_overlap()
    start = ema.ema_tensors["fc2.bias"].clone()
    weights = model.fc2.bias.detach().clone()
    ema.update()
    assert deferred.pending
    model(torch.randn(8, 4)).sum().backward()
    torch.optim.Adam(model.parameters(), lr=1.0).step()  # any optimizer, built after the EMA
    assert not deferred.pending and deferred.finished == 1
    assert not torch.equal(model.fc2.bias.detach(), weights)
    assert torch.equal(ema._averages.storages[0].tensors["fc2.bias"], start.lerp(weights, 0.5))  # type: ignore[union-attr]


def test_the_worker_really_runs_alongside() -> None:
    released = threading.Event()
    inside: list[str] = []
    overlap = ThreadOverlap()

    def work() -> None:
        inside.append(threading.current_thread().name)
        assert released.wait(10)

    overlap.launch(work)
    assert overlap.pending  # launch returned while the work is still blocked
    released.set()
    overlap.wait()
    assert not overlap.pending and inside[0].startswith("emakit-ema")


def test_a_failed_update_is_raised_at_the_wait_and_only_once() -> None:
    overlap = ThreadOverlap()

    def work() -> None:
        raise RuntimeError("boom in the worker")

    overlap.launch(work)
    with pytest.raises(RuntimeError, match="boom in the worker"):
        overlap.wait()
    overlap.wait()  # nothing pending any more
    done: list[int] = []
    overlap.launch(lambda: done.append(1))
    overlap.wait()
    assert done == [1]


def test_one_optimizer_hook_serves_every_overlap_while_it_lives() -> None:
    from torch.optim import optimizer

    from emakit.engine import overlap as overlap_module

    hooks = optimizer._global_optimizer_pre_hooks
    ThreadOverlap()
    before = len(hooks)
    overlaps = [ThreadOverlap() for _ in range(3)]
    assert len(hooks) == before  # installed once, never removed (removal inside a hook call would break torch)
    assert all(o in overlap_module._live for o in overlaps)
    probe = weakref.ref(overlaps[0])
    del overlaps
    gc.collect()
    assert probe() is None


def test_work_runs_here_once_the_worker_is_shut_down() -> None:
    overlap = ThreadOverlap()
    overlap._executor.shutdown()  # as at interpreter shutdown: no new work is accepted
    ran: list[str] = []
    overlap.launch(lambda: ran.append(threading.current_thread().name))
    overlap.wait()
    assert ran == [threading.current_thread().name]


def test_the_launched_update_reads_the_memory_of_launch_time() -> None:
    """Re-pointing a parameter (``param.data = ...``) after the launch does not change what it blends."""
    model, ema, deferred = started_with_deferred_overlap()
    start = ema.ema_tensors["fc1.weight"].clone()
    weights = model.fc1.weight.detach().clone()
    ema.update()
    model.fc1.weight.data = torch.full_like(weights, 100.0)
    deferred.wait()
    assert torch.equal(ema._averages.storages[0].tensors["fc1.weight"], start.lerp(weights, 0.5))  # type: ignore[union-attr]


def test_attach_again_waits_for_the_pending_update() -> None:
    model, ema, deferred = started_with_deferred_overlap()
    ema.update()
    ema.attach(model)
    assert deferred.finished == 1 and ema._averages.overlap is deferred


class WithMaxNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, max_norm=1.0)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))


class TiedMaxNorm(nn.Module):
    """The embedding's weight tied to a head registered before it: tracked as ``head.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.embed = nn.Embedding(10, 4, max_norm=1.0)
        self.embed.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))[:, :3]


@pytest.mark.parametrize("make", [WithMaxNorm, TiedMaxNorm])
def test_weights_the_forward_renormalises_are_blended_at_once(make: Callable[[], nn.Module]) -> None:
    def run(overlap: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = make()
        with torch.no_grad():
            model.embed.weight.mul_(5.0)  # rows above max_norm: the first forward that looks them up shrinks them
        ema = EMA(smoothing=0.5, overlap=overlap)
        ema.attach(model)
        if overlap:
            ema._averages.overlap = DeferredOverlap()
        ema._initialise(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            x = torch.randint(0, 10, (8, 3), generator=g)
            torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=g)).backward()
            opt.step()
            opt.zero_grad()
            ema.update()
        return {n: t.clone() for n, t in ema.ema_tensors.items()}

    overlapped, sync = run(True), run(False)
    for name, value in sync.items():
        assert torch.equal(overlapped[name], value), name


def test_bad_overlap_arguments() -> None:
    with pytest.raises(TypeError, match=r"overlap must be a bool, got 'yes'"):
        EMA(overlap="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"overlap=True supports CUDA and CPU tensors, got tensors on meta"):
        make_overlap(torch.device("meta"))
    model = TinyNet()
    model.fc2.to("meta")
    with pytest.raises(ValueError, match=r"overlap=True needs the model's trainable parameters on one device, found"):
        EMA(overlap=True).attach(model)


def test_no_overlap_object_without_trainable_parameters() -> None:
    model = TinyNet()
    model.requires_grad_(False)
    ema = EMA(overlap=True)
    ema.attach(model)
    assert ema._averages.overlap is None
    ema._initialise(0)
    ema.update()
    ema.wait()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_side_stream_orders_after_the_step_and_before_the_reader() -> None:
    overlap = make_overlap(torch.device("cuda"))
    assert isinstance(overlap, StreamOverlap)
    big = torch.randn(1 << 24, device="cuda")
    out = torch.zeros(1, device="cuda")
    torch.cuda._sleep(50_000_000)  # the current stream is busy: the side stream must wait for it
    big.fill_(2.0)

    def work() -> None:
        torch.cuda._sleep(50_000_000)  # and the side stream is slow: the reader must wait for it
        out.copy_(big.sum().reshape(1))

    overlap.launch(work)
    overlap.wait()
    assert out.item() == 2.0 * big.numel()
    other = torch.cuda.Stream()
    out.zero_()
    overlap.launch(work)
    overlap.wait()
    with torch.cuda.stream(other):  # a reader on another stream, after the wait: ordered as well
        overlap.wait()
        copy = out.clone()
    torch.cuda.synchronize()
    assert copy.item() == 2.0 * big.numel()


@cuda
@pytest.mark.parametrize("flatten", [False, True])
def test_side_stream_gives_the_synchronous_run(tmp_path: Path, flatten: bool) -> None:
    def run(overlap: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = TinyNet().cuda()
        ema = EMA(half_life="4ba", overlap=overlap, flatten_model=flatten)
        Trainer(
            model=model,
            train_dataloader=make_loader(n=64),
            max_duration="2ep",
            algorithms=[ema],
            progress_bar=False,
            device="cuda",
            seed=0,
        ).fit()
        if overlap:
            assert isinstance(ema._averages.overlap, StreamOverlap)
        return model, {n: t.clone() for n, t in ema.ema_tensors.items()}

    (m1, e1), (m2, e2) = run(False), run(True)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for name, a in e1.items():
        assert torch.equal(a, e2[name]), name


def test_a_flattened_model_still_takes_one_kernel_per_phase() -> None:
    model = make_model(0)
    ema = EMA(smoothing=0.9, overlap=True, flatten_model=True)
    ema.attach(model)
    ema._initialise(0)
    ema.update()
    ema.update()
    plan = ema._averages.storages[0]._plan  # type: ignore[union-attr]
    assert plan is not None and not plan.loose and plan.is_current()
    # parameters | float buffers | the integer buffer: one span each
    assert sorted((g.phase, g.averaged, g.target.dtype) for g in plan.flat) == [
        (0, False, torch.int64),
        (0, True, torch.float32),
        (1, True, torch.float32),
    ]
    parameters = sum(p.numel() for p in model.parameters())
    (alongside,) = [g for g in plan.flat if g.phase == 1]
    assert parameters <= alongside.target.numel() < parameters + 16 * len(list(model.parameters()))
