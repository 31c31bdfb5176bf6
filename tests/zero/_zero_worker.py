"""One DeepSpeed ZeRO run on 2 CPU ranks with an EMA, for tests/zero/test_zero.py.

``python -m torch.distributed.run --nproc_per_node=2 _zero_worker.py OUT STAGE [bf16|persistent]``: a frozen base with a trainable
low-rank adapter and head, trained by ``deepspeed.initialize`` at ZeRO ``STAGE``, with the EMA attached to
``engine.module``. Rank 0 records the whole training weights after every step (the oracle's input), what an
evaluation on the EMA gives (also right after an ordinary eval forward), and writes the exported EMA. Stage 3
also saves a checkpoint mid-run and resumes from it in a second engine. Results go to files; the final barrier
is followed by a hard exit. With ``bf16`` the model trains in bfloat16 and each rank records, after every step, its
partitions of the optimizer's fp32 master and of the bf16 parameters; no checkpoint then. With ``persistent``
(stage 3, DeepSpeed's default persistence threshold) it runs :func:`persistent_runs` only. The final barrier
is followed by a hard exit (a teardown abort must not fail the test).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from _launch import finish
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from deepspeed.utils import safe_get_local_fp32_param
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _collectives import count_collectives

from emakit import EMA, export_ema_weights

SMOOTHING = 0.75
HALF_LIVES = ("2ba", "5ba")
STEPS, SAVE_AT = 6, 3


class Adapted(nn.Module):
    """A frozen base layer with a trainable low-rank adapter (LoRA-style), then a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(24, 32)
        self.lora_a = nn.Linear(24, 4, bias=False)
        self.lora_b = nn.Linear(4, 32, bias=False)
        self.head = nn.Linear(32, 3)
        nn.init.normal_(self.lora_b.weight, std=0.1)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.base(x) + self.lora_b(self.lora_a(x))))


def config(stage: int, bf16: bool = False, persistent: bool = False) -> dict:
    """``persistent``: DeepSpeed's default persistence threshold, under which every parameter of this small
    model is persistent (stays gathered between forwards); otherwise 0, so that all are partitioned."""
    zero = {"stage": stage} if persistent else {"stage": stage, "stage3_param_persistence_threshold": 0}
    return {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 0.05, "torch_adam": True}},
        "zero_optimization": zero,
    }


def make_engine(stage: int, bf16: bool = False, persistent: bool = False) -> deepspeed.DeepSpeedEngine:
    torch.manual_seed(0)
    model = Adapted()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config(stage, bf16, persistent))
    return engine


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 24, generator=g), torch.randint(0, 3, (4,), generator=g)


def train_step(engine: deepspeed.DeepSpeedEngine, step: int) -> None:
    x, y = batch(step, dist.get_rank())
    x = x.to(next(engine.module.parameters()).dtype)
    loss = nn.functional.cross_entropy(engine(x), y)
    engine.backward(loss)
    engine.step()


def whole_weights(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered under ZeRO-3), as CPU copies."""
    params = dict(engine.module.named_parameters())
    with GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def trainable(engine: deepspeed.DeepSpeedEngine) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def held(param: nn.Parameter, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's elements of a ZeRO-3 parameter from its partition (or ``tensor``, laid out alike): rank r's
    partition starts at r times its size, and what lies past the parameter's end is padding."""
    tensor = param.ds_tensor if tensor is None else tensor
    size = param.ds_tensor.numel()
    return tensor[: max(0, min(size, param.ds_numel - dist.get_rank() * size))].detach().clone()


def poison_padding(engine: deepspeed.DeepSpeedEngine) -> None:
    """NaN in the padding of every partition, and of the optimizer's master, which it copies into them."""
    for p in engine.module.parameters():
        p.ds_tensor[held(p).numel() :] = float("nan")
        if p.requires_grad:
            safe_get_local_fp32_param(p)[held(p).numel() :] = float("nan")


def partitions(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """This rank's elements of every parameter (the whole parameter under ZeRO-2)."""
    return {n: held(p) if hasattr(p, "ds_tensor") else p.detach().clone() for n, p in engine.module.named_parameters()}


def persistent_runs(out: Path, rank: int) -> None:
    """Persistent parameters (the default threshold): the same steps with an evaluation on the EMA after step
    ``SAVE_AT`` and without; what the evaluation gave, and both runs' training weights and EMA partitions."""
    record: dict = {}
    for with_eval in (True, False):
        engine = make_engine(3, persistent=True)
        ema = EMA(smoothing=SMOOTHING)
        ema.attach(engine.module)
        weights = []
        for step in range(1, STEPS + 1):
            train_step(engine, step)
            ema.step()
            weights.append(whole_weights(engine))
            if with_eval and step == SAVE_AT:
                record["persistent"] = [bool(p.ds_persist) for p in engine.module.parameters()]
                engine.eval()
                with torch.no_grad(), ema.average_parameters():
                    record["x"] = batch(99, 0)[0]
                    record["on_ema"] = engine(record["x"])
                engine.train()
        record[with_eval] = {"weights": weights, "ema": partitions_of(ema), "training": partitions(engine)}
    finish(record, out / f"persistent_rank{rank}.pt")


def partitions_of(ema: EMA) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in ema.state_dict()["ema"].items()}


def main() -> None:
    out, stage, bf16 = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["bf16"]
    if sys.argv[3:] == ["persistent"]:
        persistent_runs(out, int(os.environ["RANK"]))
    engine = make_engine(stage, bf16)
    rank = dist.get_rank()
    record: dict = {"stage": stage, "layout": {}}
    for name, p in engine.module.named_parameters():
        if stage == 3:
            record["layout"][name] = (p.numel(), p.ds_tensor.numel(), p.ds_numel, held(p).numel())
    if stage == 3:  # DeepSpeed leaves the padding uninitialised: any bits; NaN here, which must not matter
        with torch.no_grad():
            poison_padding(engine)

    ema = EMA(smoothing=SMOOTHING)
    ema.attach(engine.module)
    guarded = EMA(smoothing=SMOOTHING, skip_nonfinite=True)
    guarded.attach(engine.module)
    record["refused"] = {}
    try:
        EMA(snapshot_folder=out / f"snapshots{rank}", snapshot_interval="1ba").attach(engine.module)
    except ValueError as error:
        record["refused"]["snapshots"] = str(error)
    several = EMA(half_life=list(HALF_LIVES))  # several averages from one read of the partitions
    several.attach(engine.module)
    weights, calls, masters, bf16_parts = [], [], [], []
    for step in range(1, STEPS + 1):
        train_step(engine, step)
        with count_collectives() as collectives:
            ema.step()
            several.step()
        guarded.step()
        calls.append(list(collectives))
        weights.append(whole_weights(engine))
        if bf16:
            masters.append({n: held(p, safe_get_local_fp32_param(p)) for n, p in trainable(engine)})
            bf16_parts.append({n: held(p) for n, p in trainable(engine)})
        if step == SAVE_AT and stage == 3 and not bf16:
            engine.save_checkpoint(str(out / "ds"), tag="mid")
            torch.save(ema.state_dict(), out / f"ema_mid_rank{rank}.pt")
    if bf16:
        record.update(masters=masters, bf16_parts=bf16_parts, ema=dict(ema.state_dict()["ema"]))
        finish(record, out / f"bf16_rank{rank}.pt")
    record["guarded"] = {"skipped": guarded.num_skipped_nonfinite, "ema": partitions_of(guarded)}
    try:
        ema.ema_model  # noqa: B018
    except RuntimeError as error:
        record["refused"]["ema_model"] = str(error)
    record["calls"] = calls
    record["weights"] = weights
    record["ema_bytes"] = sum(t.numel() * t.element_size() for t in ema.ema_tensors.values())

    # an ordinary eval forward first: ZeRO-3 leaves the parameters gathered after it
    engine.eval()
    x_eval, _ = batch(99, 0)
    before = partitions(engine)
    with torch.no_grad():
        plain = engine(x_eval)
        record["gathered_after_eval"] = [
            getattr(p, "ds_status", None) is not None and p.ds_status.name == "AVAILABLE"
            for p in engine.module.parameters()
        ]
        with ema.average_parameters():
            on_ema = engine(x_eval)
            on_ema_again = engine(x_eval)
        plain_after = engine(x_eval)
    after = partitions(engine)
    record["eval"] = {"plain": plain, "ema": on_ema, "ema_again": on_ema_again, "plain_after": plain_after, "x": x_eval}
    record["unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
    record["weights_after_eval"] = whole_weights(engine)
    engine.train()
    export_ema_weights(ema, out / f"ema_stage{stage}.safetensors")
    export_ema_weights(ema, out / f"ema_stage{stage}_sharded", max_shard_size=1000)  # Transformers' layout
    for index in range(len(HALF_LIVES)):
        several.eval_average = index
        export_ema_weights(several, out / f"several{index}_stage{stage}.safetensors")
    record["final_partitions"] = {n: t.clone() for n, t in ema.state_dict()["ema"].items()}
    record["final_training"] = partitions(engine)

    if stage == 3:  # resume from the mid-run checkpoint in a new engine and run the same steps
        resumed = make_engine(stage)
        resumed.load_checkpoint(str(out / "ds"), tag="mid")
        ema2 = EMA(smoothing=SMOOTHING)
        ema2.attach(resumed.module)
        ema2.load_state_dict(torch.load(out / f"ema_mid_rank{rank}.pt", weights_only=True))
        for step in range(SAVE_AT + 1, STEPS + 1):
            train_step(resumed, step)
            ema2.step()
        record["resumed_partitions"] = {n: t.clone() for n, t in ema2.state_dict()["ema"].items()}
        record["resumed_training"] = partitions(resumed)
        # a state saved with another number of ranks: its partitions have another size (3 ranks here)
        state = torch.load(out / f"ema_mid_rank{rank}.pt", weights_only=True)
        name = "head.weight"
        whole = resumed.module.head.weight.ds_numel
        state["ema"][name] = torch.zeros(-(-whole // 3))
        try:
            ema2.load_state_dict(state)
            record["other_world"] = None
        except ValueError as error:
            record["other_world"] = str(error)
    finish(record, out / f"stage{stage}_rank{rank}.pt")


if __name__ == "__main__":
    main()
