"""2-rank worker (torchrun, gloo, CPU): ``export_ema_weights`` of an FSDP2 EMA called the wrong way and the right way.

``torchrun --standalone --nproc_per_node=2 _rank0_export_worker.py OUT`` runs, with the ranks' arrival timeout
at 3 s:

- ``refused``: every rank calls it, rank 0 refuses the path (an existing file): every rank records its error;
- ``every_rank``: the documented call, which writes the file;
- ``rank0_only``: ``if rank == 0: export_ema_weights(...)``; rank 0 records the error it gets and how long it
  took (last: after a call made on one rank only, the ranks' calls are out of step).

Each rank writes ``OUT/rank{R}.json``; then a final barrier and ``os._exit(0)``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import emakit.checkpoint.export as export
from emakit import EMA, export_ema_weights


def attempt(call: Any) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        call()
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e), "seconds": time.perf_counter() - start}
    return {"error": None, "seconds": time.perf_counter() - start}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    export.ARRIVAL_TIMEOUT_S = 3.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    fully_shard(model)
    ema = EMA(half_life="2ba")
    ema.attach(model)
    for _ in range(3):
        ema.step()
    seen: dict[str, Any] = {}
    if rank == 0:
        (out / "taken.safetensors").write_bytes(b"the user's file")
    dist.barrier()
    seen["refused"] = attempt(lambda: export_ema_weights(ema, out / "taken.safetensors"))
    seen["every_rank"] = attempt(lambda: export_ema_weights(ema, out / "ema.safetensors"))
    if rank == 0:
        seen["rank0_only"] = attempt(lambda: export_ema_weights(ema, out / "rank0_only.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    if os.environ.get("RANK") is None:
        raise SystemExit("run under torchrun")
    main(Path(sys.argv[1]))
