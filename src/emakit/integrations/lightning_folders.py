"""ModelParallelStrategy checkpoint folders: which of the averaging callback's tensors go into the folder, and back.

Lightning writes a callback's state to the folder's rank-0 metadata file, which cannot hold sharded tensors, and
saves the module's ``state_dict`` with torch.distributed.checkpoint, shard by shard. So the callback publishes
the average as the module's ``state_dict`` and puts, under its :data:`~emakit.checkpoint.sharded.LIGHTNING_EMA_KEY`
entry, the training weights, the averages and each rank's own replicated buffers (FSDP2's BatchNorm statistics,
:mod:`emakit.averaging.replicated`); its state in the metadata file is marked as having moved them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from emakit.averaging.replicated import RANK_KEY, own_training
from emakit.checkpoint.sharded import LIGHTNING_EMA_KEY, is_sharded_checkpoint, read_sharded_checkpoint
from emakit.engine.naming import canonical_name
from emakit.parallel.sharding import reshard_model

__all__ = ["MOVED_MARK", "move_into_folder", "read_from_folder"]

#: The mark in the callback's state (in the metadata file) saying its tensors are in the folder.
MOVED_MARK = "tensors_in_state_dict"


def move_into_folder(ema_state: Mapping[str, Any], training: Mapping[str, Any], state_key: str) -> dict[str, Any]:
    """``{LIGHTNING_EMA_KEY: tensors, "callback": state}``: the training weights and the tensors of the averager's
    ``ema_state`` (DTensors, and this rank's own replicated buffers), and the callback's state left without them."""
    if LIGHTNING_EMA_KEY in training:
        raise ValueError(f"the module has a tensor named {LIGHTNING_EMA_KEY!r}, the key {state_key} saves under")
    rest = dict(ema_state)
    tensors = {"training": dict(training), "ema": rest["ema"]}
    if rest.get("more_averages"):
        tensors["more_averages"] = list(rest["more_averages"])
    if rest.get(RANK_KEY):  # every rank writes its own entry into the folder
        tensors[RANK_KEY] = rest.pop(RANK_KEY)
    return {
        LIGHTNING_EMA_KEY: tensors,
        "callback": {"ema": {**rest, "ema": None, "more_averages": []}, MOVED_MARK: True},
    }


def read_from_folder(path: Any, module: nn.Module, state: dict[str, Any], state_key: str, strict: bool) -> None:
    """Read this rank's shards of the training weights and the averages from the folder ``path`` (no collective):
    the training weights into ``module`` (this rank's own replicated buffers over the one copy the folder keeps),
    the averager's tensors back into ``state["ema"]`` for ``load_state_dict``."""
    if path is None or not is_sharded_checkpoint(path):
        raise ValueError(
            f"the {state_key} state says its tensors are in a distributed checkpoint folder, but {path!r} is not one"
        )
    reshard_model(module)
    found = read_sharded_checkpoint(path, module, keep=lambda keys: keys[:2] == ("state_dict", LIGHTNING_EMA_KEY))
    tensors = found.get("state_dict", {}).get(LIGHTNING_EMA_KEY)
    if not isinstance(tensors, Mapping) or not isinstance(tensors.get("training"), Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds no {LIGHTNING_EMA_KEY!r} entry in its state_dict")
    ema_state = {**state["ema"], "ema": tensors.get("ema"), "more_averages": tensors.get("more_averages") or []}
    if tensors.get(RANK_KEY):
        ema_state[RANK_KEY] = tensors[RANK_KEY]
    own = own_training(ema_state)
    module.load_state_dict(
        {key: own.get(canonical_name(key), value) for key, value in tensors["training"].items()}, strict=strict
    )
    state["ema"] = ema_state
