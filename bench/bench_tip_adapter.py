"""Tip-Adapter-F fit time against training rows (2k / 4k / 8k) with the default 16-shot cache,
then (``--compare``) with a cache of every training row as before; prints each time as it is
measured and the growth exponent (slope of log time over log rows; 1 linear, 2 quadratic).

    python bench/bench_tip_adapter.py [--compare] [--epochs 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.heads import TipAdapterHead

SIZES = (2000, 4000, 8000)
DIM = 768  # CLIP ViT-L/14 image features


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, DIM)) + 0.3 * np.outer(2 * y - 1, rng.normal(size=DIM))
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def _fit_seconds(n: int, n_shots: int | None, epochs: int) -> float:
    X, y = _data(n)
    Xv, yv = _data(n // 4, seed=1)
    text = np.random.default_rng(2).normal(size=(2, DIM))
    head = TipAdapterHead(finetune=True, epochs=epochs, n_shots=n_shots, class_text_emb=text)
    start = time.perf_counter()
    head.fit(X, y, X_val=Xv, y_val=yv)
    return time.perf_counter() - start


def _exponent(times: list[float]) -> float:
    return float(np.polyfit(np.log(SIZES), np.log(times), 1)[0])


def _series(label: str, n_shots: int | None, epochs: int) -> list[float]:
    times = []
    for n in SIZES:
        times.append(_fit_seconds(n, n_shots, epochs))
        print(f"{label:>16} {n:>6} rows: {times[-1]:8.2f} s", flush=True)
    print(f"{label:>16} time exponent: {_exponent(times):.2f}", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--compare", action="store_true", help="also time a cache of every row")
    ap.add_argument("--epochs", type=int, default=20, help="Tip-Adapter-F epochs (paper: 20)")
    args = ap.parse_args()
    _fit_seconds(500, 16, 1)  # warm up torch
    default = _series("16-shot cache", 16, args.epochs)
    per_row = default[-1] / SIZES[-1]
    print(f"extrapolated to ProGAN's 432k rows: {per_row * 432_000 / 60:.1f} min", flush=True)
    if args.compare:
        full = _series("all-rows cache", None, args.epochs)
        for n, a, b in zip(SIZES, default, full):
            print(f"{n:>6} rows: all-rows / 16-shot = {b / a:.1f} x", flush=True)


if __name__ == "__main__":
    main()
