"""Peak memory of ``emakit average``: K checkpoints of a model of S MB, next to loading them all.

python benchmarks/average_memory.py [--size-mb 200] [--count 5] [--chunk-mb 64] [--quick] [--keep DIR]

Writes ``--count`` checkpoints of a float32 model of about ``--size-mb`` MB (a 32k x 1024 embedding-like
matrix, 1024 x 4096 blocks, biases and an integer counter) as safetensors and as ``torch.save`` files, then
averages them in a fresh process for each input/output format pair and reports the peak resident memory
*increase* during the call (the process's peak RSS, VmHWM, minus its RSS just before the call,
after every import), in MB and as a multiple of one model's size. The last row does what a naive script
does, ``torch.load`` every checkpoint and average in memory, for comparison. Memory, not time: printed, never
asserted here (``tests/benchmarks/test_average_memory.py`` holds a generous bound).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20
FORMATS = (".safetensors", ".pt")


def model_shapes(size_mb: float) -> dict[str, tuple[int, ...]]:
    """Float32 shapes adding up to about ``size_mb`` MB: one large matrix, square-ish blocks, biases."""
    width = 1024 if size_mb >= 64 else 128
    block = width * 4 * width * 4  # bytes of one width x 4*width float32 matrix
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (max(1, int(size_mb * MB * 0.15) // (width * 4)), width)}
    left = size_mb * MB - shapes["embed.weight"][0] * width * 4
    for i in range(max(1, int(left // (block + 16 * width)))):
        shapes[f"blocks.{i}.weight"] = (width, 4 * width)
        shapes[f"blocks.{i}.bias"] = (4 * width,)
    return shapes


def make_checkpoints(folder: Path, count: int, size_mb: float) -> dict[str, list[Path]]:
    """``count`` checkpoints of one model in each format; returns format -> paths."""
    import torch
    from safetensors.torch import save_file

    shapes = model_shapes(size_mb)
    made: dict[str, list[Path]] = {fmt: [] for fmt in FORMATS}
    for k in range(count):
        g = torch.Generator().manual_seed(k)
        sd = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
        sd["step"] = torch.tensor(1000 * (k + 1))
        for fmt in FORMATS:
            path = folder / f"ck{k}{fmt}"
            save_file(sd, path) if fmt == ".safetensors" else torch.save(sd, path)
            made[fmt].append(path)
        del sd
    return made


def _rss_now() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    """This process's peak RSS. VmHWM, not getrusage: Linux carries ``ru_maxrss`` across ``exec``, so a child
    started from a large parent (a long pytest run) would report the parent's size as its own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(args: argparse.Namespace) -> None:
    """In a fresh process: import everything, note the RSS, average, report the peak increase as JSON."""
    import torch
    from safetensors import safe_open  # noqa: F401 (imported before the baseline)

    from emakit.checkpoint.average import average_checkpoints

    before = _rss_now()
    if args.naive:
        loaded = [torch.load(p, weights_only=True) for p in args.paths]
        mean = {n: sum(sd[n].double() for sd in loaded) / len(loaded) for n in loaded[0]}
        torch.save({n: v.to(loaded[-1][n].dtype) for n, v in mean.items()}, args.out)
    else:
        average_checkpoints(args.paths, args.out, chunk_bytes=args.chunk_mb * MB)
    print(json.dumps({"increase": _peak_rss() - before}))


def measure(paths: list[Path], out: Path, *, chunk_mb: int = 64, naive: bool = False) -> int:
    """Peak RSS increase, in bytes, of averaging ``paths`` into ``out`` in a fresh process."""
    command = [sys.executable, __file__, "--child", "--out", str(out), "--chunk-mb", str(chunk_mb), *map(str, paths)]
    if naive:
        command.append("--naive")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {out.name} failed:\n{proc.stderr}")
    out.unlink(missing_ok=True)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["increase"])


def run(folder: Path, count: int, size_mb: float, chunk_mb: int, *, naive: bool = True) -> list[tuple[str, int]]:
    """(row name, peak increase in bytes) for every input/output format pair, and the naive loop."""
    made = make_checkpoints(folder, count, size_mb)
    rows = []
    for fmt in FORMATS:
        for out_fmt in FORMATS:
            increase = measure(made[fmt], folder / f"avg{out_fmt}", chunk_mb=chunk_mb)
            rows.append((f"{fmt[1:]} -> {out_fmt[1:]}", increase))
    if naive:
        rows.append(("naive: torch.load all, average", measure(made[".pt"], folder / "naive.pt", naive=True)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=200.0, help="one model's size in MB (default: %(default)s)")
    p.add_argument("--count", type=int, default=5, help="checkpoints to average (default: %(default)s)")
    p.add_argument("--chunk-mb", type=int, default=64, help="emakit average's --chunk-mb (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 3 checkpoints of 8 MB")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoints to DIR (default: a temporary folder)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    count, size_mb = (3, 8.0) if args.quick else (args.count, args.size_mb)
    with tempfile.TemporaryDirectory(prefix="emakit-average-memory-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = run(folder, count, size_mb, args.chunk_mb)
        one = sum(f.stat().st_size for f in [folder / "ck0.safetensors"])
    tag = "  [--quick: figures not representative]" if args.quick else ""
    print(f"== peak RSS increase, averaging {count} checkpoints of {one / MB:.0f} MB (--chunk-mb {args.chunk_mb}){tag}")
    print(f"{'inputs -> output':<34}{'MB':>10}{'x model':>10}")
    print("-" * 54)
    for name, increase in rows:
        print(f"{name:<34}{increase / MB:>10.1f}{increase / one:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
