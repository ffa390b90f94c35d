"""A stand-in worker for the killed-worker test: trains on two ranks for ever and
prints the ranks' pids once the first epoch is reported, then waits to be killed."""

from __future__ import annotations

import os

import numpy as np
import psutil

from forge.training.base import Dataset, Deadline, EpochReport
from forge.training.distributed import Ranks, train


def main() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    metadata = [{"label": int(v[0] > 0)} for v in vectors]
    data = Dataset([f"r{i}" for i in range(200)], vectors, metadata)
    printed: list[bool] = []

    def on_epoch(report: EpochReport) -> None:
        if not printed:
            children = psutil.Process(os.getpid()).children(recursive=True)
            ranks = [c.pid for c in children if any("spawn_main" in p for p in c.cmdline())]
            print(" ".join(map(str, ranks)), flush=True)
            printed.append(True)

    params = {"label_field": "label", "epochs": 100_000, "patience": 100_000, "hidden_dim": 4}
    train(
        data,
        params,
        ranks=Ranks(2, gpus=False),
        warm_start=None,
        on_epoch=on_epoch,
        deadline=Deadline.after(120),
    )


if __name__ == "__main__":
    main()
