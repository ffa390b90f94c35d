"""Benchmark: data-parallel classifier training (``resources``) on N processes against
the one-process trainer, same rows, same parameters.

    .venv/bin/python bench/distributed.py [--rows 50000] [--epochs 5] [--batch-size 256]
        [--hidden-dim 256] [--processes 2] [--repeat 3] [--gpus]

Data and model as in bench/training.py (digits upsampled to ``--rows`` noisy rows, an
MLP head, early stopping off). Variants, interleaved within each repeat (best counts):

* ``1 process``: ``ClassifierTrainer.train`` in this process, with the torch threads
  it has (``--threads``; default torch's own, one per core, as a worker trains today).
* ``N processes``: ``forge.training.distributed.train``: N ranks started by torch's
  elastic launcher, gloo (or NCCL with ``--gpus``), each on its DistributedSampler
  shard, each with ``cores / N`` torch threads.

Both are timed twice: the whole call (for the ranks: launch, rendezvous, spawn and
torch import in every rank included, what a request pays) and the epochs alone (first
to last epoch report, scaled to all epochs), which leaves out the split, the final
metrics and the launch.

Samples/s = training rows x epochs / seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from bench.training import make_dataset, params, train_rows
from forge.training.base import Dataset, Deadline, EpochReport
from forge.training.distributed import Ranks, train
from forge.training.tasks import get_trainer, parse_params


class _Epochs:
    """When each epoch was reported: the epochs' seconds, without what comes before the
    first and after the last (launch, split, metrics)."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def __call__(self, report: EpochReport) -> None:
        self.at.append(time.perf_counter())

    def seconds(self, epochs: int) -> float:
        # First to last report spans epochs - 1 epochs.
        return (self.at[-1] - self.at[0]) / max(len(self.at) - 1, 1) * epochs


def one_process(data: Dataset, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds of the whole call, and of the epochs alone."""
    trainer, epochs = get_trainer("classifier"), _Epochs()
    started = time.perf_counter()
    trainer.train(
        data,
        parse_params(trainer, params(args)),
        warm_start=None,
        on_epoch=epochs,
        deadline=Deadline.after(3600),
    )
    return time.perf_counter() - started, epochs.seconds(args.epochs)


def ranks(data: Dataset, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds of the whole call, and of the epochs alone."""
    epochs = _Epochs()
    started = time.perf_counter()
    train(
        data,
        params(args),
        ranks=Ranks(args.processes, gpus=args.gpus),
        warm_start=None,
        on_epoch=epochs,
        deadline=Deadline.after(3600),
    )
    return time.perf_counter() - started, epochs.seconds(args.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="1-process torch threads")
    parser.add_argument("--gpus", action="store_true", help="ranks on GPUs (NCCL)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.threads:
        torch.set_num_threads(args.threads)

    data = make_dataset(args.rows)
    samples = train_rows(data) * args.epochs
    print(
        f"torch={torch.__version__} cores={cores} threads(1 process)={torch.get_num_threads()}"
        f" rows={args.rows} train_rows={train_rows(data)} epochs={args.epochs}"
        f" batch={args.batch_size} hidden={args.hidden_dim} processes={args.processes}"
    )
    variants = {"1 process": one_process, f"{args.processes} processes": ranks}
    best = {name: (float("inf"), float("inf")) for name in variants}
    for repeat in range(args.repeat):
        for name, run in variants.items():
            whole, epochs = run(data, args)
            best[name] = (min(best[name][0], whole), min(best[name][1], epochs))
            print(f"  repeat {repeat + 1} {name:12s} call {whole:7.2f}s epochs {epochs:7.2f}s")
    base_whole, base_epochs = best["1 process"]
    header = f"{'call samples/s':>15s} {'ratio':>6s} {'epochs samples/s':>17s} {'ratio':>6s}"
    print(f"\n{'variant':12s} {header}")
    for name, (whole, epochs) in best.items():
        print(
            f"{name:12s} {samples / whole:15,.0f} {base_whole / whole:6.2f}"
            f" {samples / epochs:17,.0f} {base_epochs / epochs:6.2f}"
        )


if __name__ == "__main__":
    main()
