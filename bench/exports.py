"""Benchmark: a classifier version's predict speed under torch, its ONNX export and its
int8-quantized ONNX export (a training request's ``"export": ["onnx"]``).

    .venv/bin/python bench/exports.py [--rows 20000] [--hidden-dim 256] [--epochs 5]
        [--batch-sizes 1,32,1024] [--predict-rows 20000] [--threads N] [--repeat 5]

Data: scikit-learn's digits (1,797 8x8 images as 64-d vectors, 10 classes) upsampled
to ``--rows`` rows with a little Gaussian noise per copy. One classifier (64 -> hidden,
ReLU, dropout -> 10) is trained through ``ClassifierTrainer`` and exported through
``forge.training.exports`` as a training with exports does it; the three runtimes are
then loaded as serving loads them (``onnx_runtime.serving_model``) from the saved files.

Each variant calls ``predict`` (the serving interface: a label and a score per row) on
``--predict-rows`` rows in batches of each ``--batch-sizes`` size; the variants are
interleaved within each repeat and the best repeat counts. Rows/s = rows predicted /
wall time; ratios are against torch in the same run. The accuracy deltas are those the
export recorded on the validation split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from forge.training import export_format, exports
from forge.training.base import Dataset, Deadline, TrainedModel
from forge.training.classifier import ClassifierParams, ClassifierTrainer
from forge.training.classifier_model import ClassifierModel
from forge.training.onnx_runtime import OnnxClassifier

VARIANTS = ("torch", "onnx", "int8")


def make_dataset(rows: int, seed: int = 0) -> Dataset:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(digits.data), rows)
    noise = rng.normal(0, 0.02, (rows, digits.data.shape[1]))
    vectors = (digits.data[pick] / 16.0 + noise).astype(np.float32)
    return Dataset(
        ids=[f"r{i}" for i in range(rows)],
        vectors=vectors,
        metadata=[{"digit": int(label)} for label in digits.target[pick]],
    )


def build(args: argparse.Namespace, folder: Path) -> tuple[dict[str, TrainedModel], str]:
    """The three runtimes of one trained, exported and saved classifier; a summary."""
    data = make_dataset(args.rows)
    params = ClassifierParams(
        label_field="digit", hidden_dim=args.hidden_dim, epochs=args.epochs, patience=100
    )
    model = ClassifierTrainer().train(
        data, params, warm_start=None, on_epoch=lambda r: None, deadline=Deadline.after(3600)
    )
    validation, truth = exports.validation_rows(data, params)
    exports.attach(model, validation, truth).save(folder)
    manifest = export_format.read_manifest(folder)
    assert manifest is not None
    torch_model = ClassifierModel.load(folder)
    runtimes: dict[str, TrainedModel] = {"torch": torch_model}
    for variant, file in (("onnx", exports.ONNX_FILE), ("int8", exports.INT8_FILE)):
        runtimes[variant] = OnnxClassifier.open(torch_model, folder / exports.EXPORT_DIR / file)
    summary = (
        f"validation rows {manifest.validation_rows}: torch accuracy "
        f"{manifest.torch_accuracy:.4f}, onnx delta {manifest.onnx.accuracy_delta:+.4f}, "
        f"int8 delta {manifest.int8.accuracy_delta:+.4f}"
    )
    return runtimes, summary


def timed(model: TrainedModel, rows: np.ndarray, batch: int) -> float:
    """Rows/s of ``model.predict`` over ``rows`` in batches of ``batch``."""
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        model.predict(rows[start : start + batch])
    return len(rows) / (time.perf_counter() - started)


def agreement(runtimes: dict[str, TrainedModel], rows: np.ndarray) -> dict[str, float]:
    expected = [p.label for p in runtimes["torch"].predict(rows)]
    result = {}
    for name, model in runtimes.items():
        got = [p.label for p in model.predict(rows)]
        result[name] = sum(a == b for a, b in zip(got, expected, strict=True)) / len(rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,32,1024")
    parser.add_argument("--predict-rows", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="forge-bench-exports-") as tmp:
        runtimes, summary = build(args, Path(tmp))
        rows = make_dataset(args.predict_rows, seed=1).vectors
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {summary}")
        print("labels equal to torch's:", agreement(runtimes, rows))
        for batch in batches:
            n = min(len(rows), max(batch * 50, 2_000)) if batch == 1 else len(rows)
            best = dict.fromkeys(VARIANTS, 0.0)
            for _ in range(args.repeat):
                for name in VARIANTS:
                    best[name] = max(best[name], timed(runtimes[name], rows[:n], batch))
            report(batch, best)


def report(batch: int, best: dict[str, float]) -> None:
    base = best["torch"]
    cells: list[str] = []
    for name in VARIANTS:
        cells.append(f"{name} {best[name]:,.0f} rows/s ({best[name] / base:.2f}x)")
    print(f"batch {batch:>5}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
