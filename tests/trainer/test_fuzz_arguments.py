"""Hypothesis fuzzes every user-facing argument: each input works or raises ValueError/TypeError, never else."""

from __future__ import annotations

import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emakit.functional as ef
from conftest import make_loader, make_model
from emakit import EMA
from emakit.callbacks import CheckpointSaver
from emakit.time import Time
from emakit.trainer import Trainer

time_strings = st.builds(
    lambda number, unit, upper: f"{number}{unit.upper() if upper else unit}",
    st.one_of(
        st.integers(-3, 30).map(str),
        st.floats(-1, 30).map(repr),
        st.sampled_from(["", ".5", "1e3", "x"]),
    ),
    st.sampled_from(["ba", "ep", "sp", "dur", "", "b", "epochs", "tok"]),
    st.booleans(),
)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    time_strings,
    st.builds(Time, st.integers(0, 20), st.sampled_from(["ba", "ep", "sp"])),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def works_or_value_type_error(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        assert str(e), "errors must say what is wrong"


@SETTINGS
@given(
    kwargs=st.dictionaries(
        st.sampled_from(
            [
                "half_life",
                "smoothing",
                "ema_start",
                "update_interval",
                "fp32_ema",
                "skip_nonfinite",
                "flatten_model",
                "overlap",
                "params",
                "buffers",
            ]
        ),
        anything,
        max_size=4,
    )
)
def test_ema_arguments(kwargs: dict[str, Any]) -> None:
    works_or_value_type_error(EMA, **kwargs)


@SETTINGS
@given(
    max_duration=anything,
    eval_interval=anything,
    save_interval=anything,
    keep=anything,
    seed=anything,
    device=st.one_of(anything, st.sampled_from(["cpu", "cuda", "cuda:1", "meta", "mps", "cpu:0", "gpu"])),
    progress_bar=anything,
    ema_start=anything,
)
def test_trainer_arguments(
    max_duration: Any,
    eval_interval: Any,
    save_interval: Any,
    keep: Any,
    seed: Any,
    device: Any,
    progress_bar: Any,
    ema_start: Any,
) -> None:
    with tempfile.TemporaryDirectory() as folder:

        def build() -> None:
            algorithms = [EMA(half_life="2ba", ema_start=ema_start)] if ema_start is not None else []
            Trainer(
                make_model(0),
                make_loader(n=16),
                max_duration,
                algorithms=algorithms,
                eval_dataloader=make_loader(n=8),
                eval_interval=eval_interval,
                save_folder=folder,
                save_interval=save_interval,
                save_num_checkpoints_to_keep=keep,
                seed=seed,
                device=device,
                progress_bar=progress_bar,
            )

        works_or_value_type_error(build)


@SETTINGS
@given(save_interval=anything, keep=anything, folder=st.one_of(anything, st.just("")))
def test_checkpoint_saver_arguments(save_interval: Any, keep: Any, folder: Any) -> None:
    works_or_value_type_error(CheckpointSaver, folder, save_interval, keep)


@SETTINGS
@given(smoothing=anything)
def test_compute_ema_smoothing(smoothing: Any) -> None:
    works_or_value_type_error(ef.compute_ema, make_model(0), make_model(1), smoothing)
