"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by test_accelerate.py: examples/accelerate_ema.py with DDP.

The example's run in one go, then cut and resumed; each rank saves both results to ``<out>/rank<r>.pt``.
Usage: ``torchrun ... _hf_accelerate_worker.py OUT``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).parents[2] / "examples" / "accelerate_ema.py"
RUN = ["--steps", "8", "--batch-size", "32", "--save-every", "3"]  # 8 micro-batches an epoch per rank


def load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("accelerate_ema", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(out: Path) -> None:
    torch.set_num_threads(1)
    example = load_example()
    full = example.main([*RUN, "--out", str(out / "full")])
    example.main([*RUN, "--out", str(out / "cut"), "--stop-after", "5"])
    resumed = example.main([*RUN, "--out", str(out / "cut"), "--resume"])
    rank = torch.distributed.get_rank()
    torch.save(
        {"world_size": torch.distributed.get_world_size(), "full": full, "resumed": resumed}, out / f"rank{rank}.pt"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    from conftest import exit_hard

    exit_hard()
