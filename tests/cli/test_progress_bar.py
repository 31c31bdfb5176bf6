"""Console output: a progress bar is drawn only on a terminal (``show_progress_bar``), by the Trainer's bar."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

import pytest

from conftest import make_loader, make_model
from emakit import EMA, Trainer
from emakit.callbacks.progress import ProgressBar, show_progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _NoIsatty:
    def write(self, text: str) -> int:
        return len(text)


def test_show_progress_bar_follows_isatty() -> None:
    assert show_progress_bar(_Terminal()) is True
    assert show_progress_bar(io.StringIO()) is False
    assert show_progress_bar(_NoIsatty()) is False
    closed = io.StringIO()
    closed.close()
    with pytest.raises(ValueError):
        closed.isatty()
    assert show_progress_bar(closed) is False


def test_show_progress_bar_reads_stderr_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert show_progress_bar() is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert show_progress_bar() is False
    monkeypatch.setattr(sys, "stderr", None)  # pythonw: no stderr at all
    assert show_progress_bar() is False


def _fit(**trainer_kwargs: object) -> Trainer:
    trainer = Trainer(make_model(0), make_loader(), "2ba", algorithms=[EMA(half_life="1ba")], **trainer_kwargs)  # type: ignore[arg-type]
    trainer.fit()
    return trainer


def _fit_demo_recorder() -> None:
    """The demo's own bar (RawVsEmaRecorder), with the Trainer's bar off, as ``emakit demo`` runs it."""
    import torch.nn.functional as F

    from emakit.demo.run import RawVsEmaRecorder

    ema = EMA(half_life="1ba")
    recorder = RawVsEmaRecorder(ema, make_loader(n=16), F.cross_entropy, progress=True)
    trainer = Trainer(make_model(0), make_loader(), "2ba", algorithms=[ema], callbacks=[recorder],
                      eval_dataloader=make_loader(n=16), eval_interval="1ba", progress_bar=False)  # fmt: skip
    trainer.fit()


@pytest.mark.parametrize("fit", [_fit, _fit_demo_recorder], ids=["trainer", "demo"])
def test_both_bars_follow_the_same_rule(fit: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    fit()
    assert pipe.getvalue() == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fit()
    assert "| 2/" in terminal.getvalue()  # two batches done (the demo's bar counts its total in epochs' batches)


def test_trainer_draws_no_bar_when_stderr_is_not_a_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()  # captured by pytest
    _fit()
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_trainer_draws_the_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _fit()
    drawn = terminal.getvalue()
    assert "2/2" in drawn  # batches done of the total
    assert "loss=" in drawn
    assert drawn.count("\r") >= 2  # redrawn in place


def test_explicit_disable_overrides_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _fit(progress_bar=False, callbacks=[ProgressBar(disable=True)])
    assert terminal.getvalue() == ""
    pipe = io.StringIO()
    _fit(progress_bar=False, callbacks=[ProgressBar(file=pipe, disable=False)])
    assert "2/2" in pipe.getvalue()
    # the rule is applied to the bar's own stream: a terminal as `file` draws even when stderr is not one
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    own = _Terminal()
    _fit(progress_bar=False, callbacks=[ProgressBar(file=own)])
    assert "2/2" in own.getvalue()
    assert sys.stderr.getvalue() == ""
