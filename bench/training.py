"""Benchmark: the classifier task inside Forge against a bare PyTorch loop training the
same MLP on the same rows.

    .venv/bin/python bench/training.py [--rows 50000] [--epochs 5] [--batch-size 256]
        [--hidden-dim 256] [--repeat 3]

Data: scikit-learn's digits (1,797 8x8 images as 64-d vectors, 10 classes) upsampled
to ``--rows`` rows, each copy with a little Gaussian noise so no two rows are equal.
Every variant trains an MLP head (64 -> hidden, ReLU, dropout 0.1 -> 10) with AdamW
(lr 1e-3, weight decay 0.01) and cross-entropy for ``--epochs`` epochs in shuffled
mini-batches over the same 80 % training split, evaluating the 20 % validation split
after each epoch; early stopping is off (patience above the epoch count). On CUDA the
trainer uses fp16 autocast, and so does the bare loop.

Variants, interleaved within each repeat (best run counts):

* ``bare``: a hand-written loop: an ``nn.Sequential``, the data as tensors on the
  device, ``randperm`` batches, a validation pass per epoch. No metrics, no snapshots.
* ``trainer``: ``ClassifierTrainer.train`` called directly (split, seeded RNG fork,
  best-epoch snapshots, per-epoch report, final metrics).
* ``service``: ``TrainingService.train_model``: the trainer under the request's
  deadline with progress callbacks, as a worker runs it, without MLflow.
* ``service+mlflow``: ``TrainingService.train``: the same inside an MLflow run (params,
  a metric point per epoch, the model's files as artifacts) plus registering the
  version and applying the promotion policy, against an embedded SQLite store in a
  temporary folder (created before timing starts).

Samples/s = training rows x epochs / wall time of the call (data already in memory;
loading a collection from PostgreSQL is not timed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from forge.embedding.model_cache import ModelCache
from forge.events import TrainingRequest
from forge.settings import Settings
from forge.training.base import Dataset, Deadline
from forge.training.classifier import ClassifierParams, ClassifierTrainer, default_device
from forge.training.service import TrainingService
from forge.training.tasks import get_trainer, parse_params
from forge.training.tracking import quiet_mlflow
from forge.training.validation import stratified_split

VALIDATION_FRACTION = 0.2


def make_dataset(rows: int, seed: int = 0) -> Dataset:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(digits.data), rows)
    noise = rng.normal(0, 0.02, (rows, digits.data.shape[1]))
    vectors = (digits.data[pick] / 16.0 + noise).astype(np.float32)
    labels = digits.target[pick]
    return Dataset(
        ids=[f"r{i}" for i in range(rows)],
        vectors=vectors,
        metadata=[{"digit": int(label)} for label in labels],
    )


def params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "label_field": "digit",
        "hidden_dim": args.hidden_dim,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "patience": args.epochs + 1,
        "validation_fraction": VALIDATION_FRACTION,
    }


def train_rows(data: Dataset) -> int:
    labels = [str(m["digit"]) for m in data.metadata]
    train, _ = stratified_split(labels, VALIDATION_FRACTION, 0)
    return len(train)


# ---------------------------------------------------------------------- variants


def bare(data: Dataset, args: argparse.Namespace) -> float:
    """A hand-written loop over the same split; returns seconds."""
    started = time.perf_counter()
    device = default_device()
    amp = device.type == "cuda"
    labels = [str(m["digit"]) for m in data.metadata]
    train, val = stratified_split(labels, VALIDATION_FRACTION, 0)
    x = torch.from_numpy(data.vectors).to(device)
    y = torch.tensor([int(label) for label in labels], device=device)
    x_train, y_train = x[torch.from_numpy(train).to(device)], y[torch.from_numpy(train).to(device)]
    x_val, y_val = x[torch.from_numpy(val).to(device)], y[torch.from_numpy(val).to(device)]
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(data.dim, args.hidden_dim),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(args.hidden_dim, 10),
    ).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    criterion = nn.CrossEntropyLoss()
    for _ in range(args.epochs):
        net.train()
        for batch in torch.split(torch.randperm(len(x_train), device=device), args.batch_size):
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = criterion(net(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        net.eval()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            accuracy = float((net(x_val).argmax(-1) == y_val).float().mean())
    if amp:
        torch.cuda.synchronize()
    assert accuracy > 0.8, accuracy
    return time.perf_counter() - started


def trainer(data: Dataset, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    model = ClassifierTrainer().train(
        data,
        ClassifierParams(**params(args)),
        warm_start=None,
        on_epoch=lambda report: None,
        deadline=Deadline.after(3600),
    )
    elapsed = time.perf_counter() - started
    assert model.metrics["val_accuracy"] > 0.8, model.metrics
    return elapsed


class ServiceVariants:
    """The training service, sharing one embedded MLflow store across runs."""

    def __init__(self, home: Path, args: argparse.Namespace) -> None:
        quiet_mlflow()
        self.settings = Settings(home_dir=home)
        self.service = TrainingService.from_settings(
            self.settings, ModelCache(10**9), progress=lambda event: None
        )
        self.service.client.search_experiments()  # create the schema before timing
        self.args = args
        self.runs = 0

    def request(self) -> TrainingRequest:
        self.runs += 1
        return TrainingRequest(
            id=f"bench-{self.runs}",
            model="bench",
            task="classifier",
            collection="digits",
            params=params(self.args),
        )

    def without_mlflow(self, data: Dataset, args: argparse.Namespace) -> float:
        started = time.perf_counter()
        request = self.request()
        task = get_trainer(request.task)
        model = self.service.train_model(
            request, data, task, parse_params(task, request.params), None
        )
        elapsed = time.perf_counter() - started
        assert model.metrics["val_accuracy"] > 0.8, model.metrics
        return elapsed

    def with_mlflow(self, data: Dataset, args: argparse.Namespace) -> float:
        started = time.perf_counter()
        _, registered = self.service.train(self.request(), data)
        elapsed = time.perf_counter() - started
        assert registered.result["metrics"]["val_accuracy"] > 0.8, registered.result
        return elapsed


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = make_dataset(args.rows)
    samples = train_rows(data) * args.epochs
    device = default_device()
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}"
        f" rows={args.rows} train_rows={train_rows(data)} epochs={args.epochs}"
        f" batch={args.batch_size} hidden={args.hidden_dim}"
    )
    with tempfile.TemporaryDirectory(prefix="forge-bench-training-") as home:
        services = ServiceVariants(Path(home), args)
        variants: dict[str, Callable[[Dataset, argparse.Namespace], float]] = {
            "bare": bare,
            "trainer": trainer,
            "service": services.without_mlflow,
            "service+mlflow": services.with_mlflow,
        }
        bare(make_dataset(2000, seed=1), args)  # warm up kernels and allocators
        best = {name: float("inf") for name in variants}
        for repeat in range(args.repeat):
            for name, run in variants.items():
                seconds = run(data, args)
                best[name] = min(best[name], seconds)
                rate = samples / seconds
                print(f"  repeat {repeat + 1} {name:15s} {seconds:7.3f}s {rate:12,.0f} samples/s")
    print(f"\n{'variant':15s} {'best s':>8s} {'samples/s':>12s} {'vs bare':>8s}")
    for name, seconds in best.items():
        print(f"{name:15s} {seconds:8.3f} {samples / seconds:12,.0f} {best['bare'] / seconds:8.2f}")
    overhead_s = best["service+mlflow"] - best["service"]
    print(f"\nMLflow per training (best service+mlflow - best service): {overhead_s:.3f}s")


if __name__ == "__main__":
    main()
