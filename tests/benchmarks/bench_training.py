"""Throughput of ResNet18 training and whole-pool inference from cached uint8 arrays.

Prints a Markdown table (images/s) per image size. The pool is written to a uint8 memmap file
first, as the image cache does, so inference reads it the way a real job does (the file is in
the page cache after writing; the first pass warms up cuDNN and is not counted).

    python tests/benchmarks/bench_training.py --device cpu --n 128 --sizes 224,64
    python tests/benchmarks/bench_training.py --device cuda --n 20000 --inference-batch-size 1024
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ml_backend.model.inference import predict  # noqa: E402
from ml_backend.model.network import build_model, resolve_device  # noqa: E402
from ml_backend.model.train import amp_dtype_for, fit  # noqa: E402


def make_pool(folder: Path, n: int, size: int, seed: int = 0) -> np.memmap:
    """A uint8 [n, size, size, 3] memmap of smooth random images (content does not matter)."""
    path = folder / f"pool-{size}.u8"
    pool = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, size, size, 3))
    rng = np.random.default_rng(seed)
    for start in range(0, n, 256):
        stop = min(start + 256, n)
        pool[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), dtype=np.uint8)
    pool.flush()
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))


def bench_size(args, device: torch.device, size: int, folder: Path) -> list[dict]:
    pool = make_pool(folder, args.n, size)
    labels = np.arange(args.n, dtype=np.int64) % 10
    model, _ = build_model(10, "none", seed=0)
    train_n = min(args.n, args.train_n or args.n)
    result = fit(
        model, pool[:train_n], labels[:train_n], epochs=args.epochs, batch_size=args.batch_size,
        lr=1e-3, val_fraction=0.0, seed=0, device=device,
    )  # fmt: skip
    last = result.history[-1]  # the first epoch includes cuDNN autotuning and allocator warm-up
    rows = [
        {
            "phase": "train",
            "size": size,
            "n": train_n,
            "batch": args.batch_size,
            "images_per_s": last["images_per_s"],
            "seconds": last["seconds"],
            "precision": result.amp,
        }
    ]
    predict(model, pool[: min(args.n, 2 * args.inference_batch_size)], device=device,
            batch_size=args.inference_batch_size)  # fmt: skip
    best = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        probs, _ = predict(model, pool, device=device, batch_size=args.inference_batch_size)
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    assert probs.shape == (args.n, 10)
    rows.append(
        {
            "phase": "inference",
            "size": size,
            "n": args.n,
            "batch": args.inference_batch_size,
            "images_per_s": round(args.n / best, 1),
            "seconds": round(best, 3),
            "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
                amp_dtype_for(device)
            ],
        }
    )
    return rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--n", type=int, default=None, help="pool size (default 128 CPU, 20000 GPU)"
    )
    parser.add_argument("--train-n", type=int, default=None, help="training images (default: --n)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--inference-batch-size", type=int, default=256)
    parser.add_argument(
        "--epochs", type=int, default=2, help="training epochs; the last is reported"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="inference passes; the best is reported"
    )
    parser.add_argument("--sizes", default="224,64", help="comma-separated image sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.n = args.n or (20000 if device.type == "cuda" else 128)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.extend(bench_size(args, device, size, Path(tmp)))
    print(f"\nResNet18 throughput on {describe(device)} (torch {torch.__version__})\n")
    print("| phase | px | images | batch | precision | images/s | seconds |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['size']} | {r['n']} | {r['batch']} | {r['precision']} "
            f"| {r['images_per_s']:,.0f} | {r['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
