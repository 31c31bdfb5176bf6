"""What the 2-rank EMA benchmarks (fsdp_ema.py, zero_ema.py) share: their arguments, rank 0's peak RSS around
each export format, and the tables they print. Imported by those scripts, which run from this folder."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def arguments(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--quick``, ``--width``, ``--layers``, ``--steps``, with their defaults filled in."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (smoke test)")
    parser.add_argument("--width", type=int, default=None, help="Linear width (default 1024; quick: 64)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default 24; quick: 3)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; quick: 4)")
    args = parser.parse_args(argv)
    args.width = args.width or (64 if args.quick else 1024)
    args.layers = args.layers or (3 if args.quick else 24)
    args.steps = args.steps or (4 if args.quick else 20)
    return args


def _peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def measure_exports(
    export: Callable[..., Any], target: Path, model_bytes: int, largest: int, barrier: Callable[[], None]
) -> dict[str, Any]:
    """Seconds and this rank's peak RSS growth of ``export(path, **kwargs)`` for each format, into ``target``."""
    results: dict[str, Any] = {}
    shard = max(largest, model_bytes // 8)
    for label, path, kwargs in (
        ("safetensors, one file", target / "ema.safetensors", {}),
        (f"sharded layout, max_shard_size {shard / 2**20:.3g} MiB", target / "sharded", {"max_shard_size": shard}),
        (".pt (torch.save)", target / "ema.pt", {}),
    ):
        barrier()
        _reset_peak_rss()
        baseline = _peak_rss()
        start = time.perf_counter()
        export(path, **kwargs)
        results[f"export: {label}"] = {
            "seconds": time.perf_counter() - start,
            "rss_mib": (_peak_rss() - baseline) / 2**20,
        }
    results["model_mib"] = model_bytes / 2**20
    results["largest_mib"] = largest / 2**20
    return results


def print_tables(args: argparse.Namespace, ranks: list[dict[str, Any]], strategies: tuple[str, ...], what: str) -> None:
    """The update table (every strategy, every rank) and rank 0's export table for ``what`` (the exported EMA)."""
    model_mib = ranks[0]["model_mib"]
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), {model_mib:.1f} MiB fp32; {args.steps} steps")
    print("== EMA update per optimizer step, 2 CPU ranks")
    print(f"{'strategy':<28}{'rank':>6}{'update ms':>12}{'EMA KiB':>14}")
    print("-" * 60)
    for name in strategies:
        for rank, result in enumerate(ranks):
            print(f"{name:<28}{rank:>6}{result[name]['update_ms']:>12.3f}{result[name]['ema_kib']:>14.1f}")
    print()
    print(f"== export of the {what}, rank 0 (largest tensor {ranks[0]['largest_mib']:.2f} MiB)")
    print(f"{'format':<48}{'seconds':>10}{'peak RSS MiB':>14}{'/ model':>10}")
    print("-" * 82)
    for key, value in ranks[0].items():
        if key.startswith("export: "):
            label = key[len("export: ") :]
            print(f"{label:<48}{value['seconds']:>10.2f}{value['rss_mib']:>14.2f}{value['rss_mib'] / model_mib:>10.2f}")
