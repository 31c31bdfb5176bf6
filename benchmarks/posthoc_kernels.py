"""Post-hoc kernels and the metric sweep on the demo's model (digits CNN): printed, never asserted.

python benchmarks/posthoc_kernels.py [--epochs 5] [--seed 0] [--fraction 0.2] [--keep DIR] [--json FILE]

``--json docs/posthoc_kernels.json`` writes the numbers docs/posthoc.md quotes (its closing note; a test checks the
page against the file).

1. Decay emulation (WSM): the demo's model is trained twice from the same seed and batches, once at the demo's
   constant learning rate with an EMA snapshotting sigma_rel 0.05, 0.10 and 1/sqrt(12) about 30 times, and once
   with the rate following a cosine (then linear, 1-sqrt) decay to 0 over the last ``--fraction``. The merge
   rebuilt from the constant run's snapshots with the matching kernel is compared with the decayed run's final
   weights, beside the constant run's final weights: distances and validation accuracy/loss. On a quadratic the
   merge provably lands nearer (tests/posthoc/test_targets.py); a CNN with BatchNorm at a large rate is no
   quadratic, so this only shows what happens here.
2. The fit error of every named kernel (BEMA's included: the snapshots hold the raw weights, ``snapshot_raw=True``)
   at the end of the constant run, and the disk cost of the raw weights per snapshot (read from the files).
3. The sweep (emakit.posthoc.sweep) over 15 sigma_rel values, decay kernels, windows, BEMA, the raw weights and the
   tracked averages, in a fresh process: its wall time, and its peak resident memory (VmHWM) against the process's
   resident memory just before it (after imports, data and one evaluation model), with the model's size for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

SHAPES = ("cosine", "linear", "1-sqrt")


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def train(epochs: int, seed: int, folder: Path | None, decay: str | None, fraction: float) -> dict[str, Any]:
    """The demo's model, data, batches and SGD; an EMA writing snapshots (``folder``) or a decayed rate (``decay``)."""
    import torch

    from emakit import EMA
    from emakit.demo.config import DemoConfig
    from emakit.demo.data import load_data
    from emakit.demo.model import build_model
    from emakit.demo.run import build_loaders
    from emakit.posthoc.profiles import SIGMA_REL_MAX
    from emakit.posthoc.targets import decay_kernel

    demo = DemoConfig(out=Path("."))
    data = load_data()
    torch.manual_seed(seed)
    model = build_model(data.input_shape, data.num_classes)
    train_loader, _ = build_loaders(data, demo.batch_size, seed)
    total = len(train_loader) * epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=demo.lr)
    multiplier = [1.0] * total
    if decay is not None:
        drops = decay_kernel(decay, fraction).masses(total)  # a((k-1)/T) = 1 - (drops of the updates before k)
        multiplier = [1.0 - float(sum(drops[:k])) for k in range(total)]
    ema = None
    if folder is not None:
        interval = max(1, math.ceil(total / 30))
        ema = EMA(
            sigma_rel=[0.05, 0.10, SIGMA_REL_MAX],
            snapshot_interval=f"{interval}ba",
            snapshot_folder=folder,
            snapshot_raw=True,
        )
        ema.attach(model)
    step = 0
    for _ in range(epochs):
        for x, y in train_loader:
            for group in optimizer.param_groups:
                group["lr"] = demo.lr * multiplier[step]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if ema is not None:
                ema.step()
    if ema is not None and total % interval:
        ema.write_snapshot()
    return {n: v.detach().clone() for n, v in model.state_dict().items()}


def evaluator(seed: int) -> Any:
    """``evaluate(weights) -> {"accuracy", "loss"}`` on the demo's validation split."""
    import torch

    from emakit.demo.config import DemoConfig
    from emakit.demo.data import load_data
    from emakit.demo.model import build_model
    from emakit.demo.run import build_loaders
    from emakit.trainer import evaluate

    data = load_data()
    _, val_loader = build_loaders(data, DemoConfig(out=Path(".")).batch_size, seed)
    with torch.random.fork_rng():
        model = build_model(data.input_shape, data.num_classes)

    def run(weights: dict[str, Any]) -> dict[str, float]:
        model.load_state_dict(weights)
        metrics = evaluate(model, val_loader, torch.nn.functional.cross_entropy)
        return {"accuracy": float(metrics["eval/accuracy"]), "loss": float(metrics["eval/loss"])}

    return run


def distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in a if a[n].is_floating_point()) ** 0.5)


def decay_emulation(args: argparse.Namespace, folder: Path) -> None:
    from emakit.posthoc import plan_reconstruction, reconstruct

    constant = train(args.epochs, args.seed, folder, None, args.fraction)
    evaluate = evaluator(args.seed)
    base = evaluate(constant)
    print(f"constant rate, final weights: accuracy {100 * base['accuracy']:.2f}%, loss {base['loss']:.4f}")
    print(
        f"{'decay':<8}{'fit err':>9}{'|merge-decayed|':>17}{'|const-decayed|':>17}{'ratio':>7}   decayed acc/loss   merge acc/loss"
    )
    for shape in SHAPES:
        decayed = train(args.epochs, args.seed, None, shape, args.fraction)
        spec = f"{shape}:{args.fraction!r}"
        plan = plan_reconstruction(folder, kernel=spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a poor fit warns; its fit error is in the table
            merged = reconstruct(folder, kernel=spec)
        near, far = distance(merged, decayed), distance(constant, decayed)
        d, m = evaluate(decayed), evaluate(merged)
        print(
            f"{shape:<8}{100 * plan.fit_error:>8.2f}%{near:>17.4f}{far:>17.4f}{near / far:>7.2f}   "
            f"{100 * d['accuracy']:.2f}% {d['loss']:.4f}   {100 * m['accuracy']:.2f}% {m['loss']:.4f}"
        )


KERNEL_TABLE = [
    *(f"{shape}:{f}" for shape in SHAPES for f in (0.1, 0.2, 0.3)),
    "power:0.07",
    "ema:50",
    "uniform:0.2",
    "bema",
    "bema:1,1,0.5,0.2",
    "raw",
]


def fit_errors_and_disk(folder: Path) -> dict[str, Any]:
    """The fit error of each named kernel at the last snapshot, and what the raw weights cost on disk."""
    import struct

    from emakit.posthoc import plan_reconstruction, read_snapshot_index

    print(f"\n{'kernel':<20}{'fit error':>10}")
    errors = {}
    for spec in KERNEL_TABLE:
        errors[spec] = plan_reconstruction(folder, kernel=spec).fit_error
        print(f"{spec:<20}{100 * errors[spec]:>9.3g}%")
    index = read_snapshot_index(folder)
    sizes: dict[str, int] = {"averages": 0, "raw": 0, "start": 0}
    for info in index:
        with info.path.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, entry in header.items():
            if key != "__metadata__":
                part = key.partition("/")[0]
                sizes[part if part in sizes else "averages"] += entry["data_offsets"][1] - entry["data_offsets"][0]
    files = sum(info.path.stat().st_size for info in index)
    n = len(index)
    print(
        f"\n{n} snapshots, {files / 2**20:.2f} MiB: per snapshot {sizes['averages'] / n / 1024:.1f} KiB of averages "
        f"({len(index[0].profiles)}), +{sizes['raw'] / n / 1024:.1f} KiB of raw weights "
        f"(+{100 * sizes['raw'] / sizes['averages']:.0f}%), theta_0 once {sizes['start'] / 1024:.1f} KiB"
    )
    return {"fit_errors": errors, "snapshots": n, "bytes": {**sizes, "files": files}, "t": index[-1].t}


def sweep_child(folder: str, seed: int) -> None:
    """Runs in a fresh process: the sweep's time and memory, as JSON on stdout."""
    import torch

    from emakit.posthoc import read_snapshot_index, reconstruct
    from emakit.posthoc.sweep import sigma_rel_grid, sweep

    evaluate = evaluator(seed)
    candidates = [f"power:{s!r}" for s in sigma_rel_grid(0.02, 0.25, 15)]
    last = read_snapshot_index(folder)[-1].t
    candidates += [f"{shape}:{f}" for shape in SHAPES for f in (0.1, 0.2, 0.3)] + [
        "uniform:0.1",
        "uniform:0.2",
        f"window:{last // 2}:{last}",
        "bema",
        "raw",
        "tracked",
    ]
    with tempfile.TemporaryDirectory() as out:
        evaluate(reconstruct(folder, sigma_rel=0.1))  # imports, and one evaluation's buffers
        rss = _vm("VmRSS")
        start = time.perf_counter()
        result = sweep(folder, evaluate, candidates, metric="loss", out=out, progress=False, plot=False)
        seconds = time.perf_counter() - start
    hwm = _vm("VmHWM")
    from emakit.demo.data import load_data
    from emakit.demo.model import build_model

    data = load_data()
    model_bytes = sum(
        t.numel() * t.element_size() for t in build_model(data.input_shape, data.num_classes).state_dict().values()
    )
    best = result.best or {}
    print(
        json.dumps(
            {
                "candidates": len(result.rows),
                "seconds": seconds,
                "rss_before": rss,
                "vmhwm": hwm,
                "model_bytes": model_bytes,
                "best": best.get("candidate"),
                "best_loss": best.get("loss"),
                "threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--keep", metavar="DIR", help="keep the snapshots here")
    parser.add_argument("--json", metavar="FILE", help="write the numbers here (docs/posthoc_kernels.json)")
    parser.add_argument("--sweep-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep_child:
        sweep_child(args.sweep_child, args.seed)
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp) / "snapshots"
        decay_emulation(args, folder)
        numbers = fit_errors_and_disk(folder)
        child = subprocess.run(
            [sys.executable, __file__, "--sweep-child", str(folder), "--seed", str(args.seed)],
            check=True,
            capture_output=True,
            text=True,
        )
    report = json.loads(child.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(
        f"\nsweep of {report['candidates']} candidates on the demo model ({report['model_bytes'] / 1024:.0f} KiB of "
        f"tensors): {report['seconds']:.2f} s; best {report['best']} (loss {report['best_loss']:.4f})\n"
        f"resident memory before the sweep {report['rss_before'] / mib:.1f} MiB, peak (VmHWM) "
        f"{report['vmhwm'] / mib:.1f} MiB: +{(report['vmhwm'] - report['rss_before']) / mib:.1f} MiB"
    )
    if args.json:
        from emakit.demo.figure import machine

        numbers.update(sweep=report, epochs=args.epochs, seed=args.seed, machine=machine())
        Path(args.json).write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
