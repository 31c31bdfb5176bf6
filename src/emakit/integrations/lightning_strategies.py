"""Which Lightning strategies and launchers the averaging callbacks can follow, and why not the others.

Importing this module imports Lightning; ``import emakit`` never does.
"""

from __future__ import annotations

try:
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
        Strategy,
    )
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
except ImportError:  # pragma: no cover - the standalone package of the same code
    try:
        from pytorch_lightning.strategies import (  # type: ignore[assignment]
            DDPStrategy,
            DeepSpeedStrategy,
            FSDPStrategy,
            ModelParallelStrategy,
            SingleDeviceStrategy,
            Strategy,
        )
        from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher  # type: ignore[assignment]
    except ImportError as error:
        raise ImportError(
            "emakit.integrations.lightning needs Lightning 2.x: pip install 'emakit[lightning]' (or lightning>=2.6)"
        ) from error

from collections.abc import Iterable
from typing import Any

__all__ = ["averaging_conflict", "launcher_refusal", "strategy_refusal"]

#: Lightning's own weight averaging, which swaps weights and rewrites checkpoints as emakit's callbacks do.
_LIGHTNING_AVERAGING = ("WeightAveraging", "EMAWeightAveraging", "StochasticWeightAveraging")


def averaging_conflict(mine: Any, callbacks: Iterable[Any], averaging: type) -> str | None:
    """Why the averaging callback ``mine`` cannot run beside one of ``callbacks`` (Lightning's weight averaging,
    or another ``averaging`` callback), or None."""
    for callback in callbacks:
        name = type(callback).__name__
        if name in _LIGHTNING_AVERAGING:
            return f"{type(mine).__name__} and Lightning's {name} both swap weights at validation and rewrite checkpoints; use one"
        if callback is not mine and isinstance(callback, averaging):
            kinds = {type(mine.averager).__name__, type(callback.averager).__name__}  # type: ignore[attr-defined]
            why = "EMA and SWA do not compose" if len(kinds) > 1 else "one averaging callback per Trainer"
            return (
                f"{why}: {type(mine).__name__} and {name} would each put their own average into the module for "
                "validation and checkpoints; use one (several EMAs in one pass: EMACallback(half_life=[...]))"
            )
    return None


def strategy_refusal(strategy: Strategy) -> str | None:
    """Why the EMA cannot follow ``strategy`` faithfully, or None if it can."""
    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        if not getattr(strategy, "_save_distributed_checkpoint", True):
            return (
                f"emakit's averaging callbacks do not support {name}(save_distributed_checkpoint=False): that gathers the whole "
                "model into one file on rank 0, while the EMA stays sharded. Keep save_distributed_checkpoint=True "
                "(the default; the EMA is stored beside the weights in the checkpoint folder) and write a whole "
                "EMA file with emakit.export_ema_weights"
            )
        return None
    if isinstance(strategy, FSDPStrategy):
        return (
            f"emakit's averaging callbacks do not support strategy {name} (FSDP1, FlatParameter sharding): use "
            "ModelParallelStrategy with torch.distributed.fsdp.fully_shard (FSDP2) in configure_model, under which "
            "the EMA keeps each rank's shards with no communication; or strategy='ddp' (or one device)"
        )
    if isinstance(strategy, DeepSpeedStrategy):
        return (
            f"emakit's averaging callbacks do not support strategy {name}: Lightning's DeepSpeed strategy runs on CUDA "
            "GPUs only, where emakit cannot test it yet (on CPU, Lightning itself refuses it: 'The DeepSpeed strategy "
            "is only supported on CUDA GPUs'). emakit's ZeRO-3 EMA is supported in DeepSpeed's own loop "
            "(deepspeed.initialize) and in the Transformers Trainer (TrainingArguments.deepspeed); under Lightning, "
            "use strategy='ddp' (or one device), or ModelParallelStrategy with fully_shard (FSDP2) to shard the model"
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return f"emakit's averaging callbacks support one device, strategy='ddp' and ModelParallelStrategy, got strategy {name}"
    if isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher):
        return launcher_refusal(name)
    return None


def launcher_refusal(name: str) -> str:
    return (
        f"emakit's averaging callbacks do not support {name} started by spawning or forking (strategy='ddp_spawn', "
        "'ddp_fork', 'ddp_notebook'): training then runs in child processes that return only the model's "
        "weights, so callback.averager in this process would never see the average. Use strategy='ddp' (Lightning "
        "launches the script once per device) or launch with torchrun"
    )
