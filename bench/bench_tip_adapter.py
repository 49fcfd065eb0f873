"""Tip-Adapter-F fit time against training rows (2k / 4k / 8k), with the paper's 16-shot cache
and, for comparison, a cache of every training row; prints times side by side and the growth
exponent (slope of log time over log rows; 1 is linear, 2 quadratic)."""

from __future__ import annotations

import math
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


def _fit_seconds(n: int, n_shots: int | None) -> float:
    X, y = _data(n)
    Xv, yv = _data(n // 4, seed=1)
    text = np.random.default_rng(2).normal(size=(2, DIM))
    head = TipAdapterHead(finetune=True, n_shots=n_shots, class_text_emb=text)
    start = time.perf_counter()
    head.fit(X, y, X_val=Xv, y_val=yv)
    return time.perf_counter() - start


def _exponent(times: list[float]) -> float:
    logs_n = np.log(SIZES)
    return float(np.polyfit(logs_n, np.log(times), 1)[0])


def main() -> None:
    _fit_seconds(500, 16)  # warm up torch
    default = [_fit_seconds(n, 16) for n in SIZES]
    full = [_fit_seconds(n, None) for n in SIZES]
    print(f"{'rows':>6} {'16-shot cache (s)':>18} {'all-rows cache (s)':>19} {'ratio':>6}")
    for n, a, b in zip(SIZES, default, full):
        print(f"{n:>6} {a:>18.2f} {b:>19.2f} {b / a:>6.1f}")
    print(f"time exponent: 16-shot {_exponent(default):.2f}, all rows {_exponent(full):.2f}")
    hours = full[-1] * (432_000 / SIZES[-1]) ** _exponent(full) / 3600
    per_row = default[-1] / SIZES[-1]
    print(
        f"extrapolated to ProGAN's 432k rows: 16-shot {per_row * 432_000 / 60:.1f} min, "
        f"all rows {hours:.1f} h" + ("" if math.isfinite(hours) else "")
    )


if __name__ == "__main__":
    main()
