"""The ``clustering`` task: mini-batch k-means over a collection's vectors.

A model numbers its clusters 0..n-1 and reports each training row's cluster in
``assignments`` for the caller to write back into metadata. A warm start from a
previous version with the same dimension and ``n_clusters`` starts from its centres,
so cluster numbers stay stable across versions as the data grows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
from msgspec import Meta
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import silhouette_score

from forge.errors import PermanentError
from forge.training.base import (
    Dataset,
    Deadline,
    EpochCallback,
    EpochReport,
    Prediction,
    TaskTrainer,
    TrainedModel,
    TrainerParams,
    TrainingControls,
    Vectors,
    eta_s,
    read_json,
    write_json,
)

CONFIG_FILE = "config.json"
CENTERS_FILE = "centers.npy"
_PREDICT_BATCH_ROWS = 8192


class ClusteringParams(TrainerParams, frozen=True, kw_only=True, forbid_unknown_fields=True):
    n_clusters: Annotated[int, Meta(ge=2, le=100_000)] = 8
    batch_size: Annotated[int, Meta(ge=1)] = 1024
    # Passes over the data (each one mini-batch per ``batch_size`` rows).
    max_iter: Annotated[int, Meta(ge=1, le=100_000)] = 100
    # Stop once a pass improves the inertia by less than this fraction.
    tol: Annotated[float, Meta(ge=0)] = 1e-4
    silhouette_sample_size: Annotated[int, Meta(ge=2)] = 5000


class ClusteringModel:
    """Cluster centres. ``predict`` labels a vector ``cluster-<n>`` for its nearest
    centre (Euclidean) with score ``-distance``: higher is closer, 0 is on the centre."""

    task = "clustering"
    primary_metric = "silhouette"

    def __init__(
        self,
        centers: npt.NDArray[np.float32],
        metrics: dict[str, float],
        assignments: dict[str, int] | None = None,
    ) -> None:
        self.centers = np.ascontiguousarray(centers, dtype=np.float32)
        self.metrics = dict(metrics)
        # Training rows only; not saved, so a loaded model has none.
        self.assignments: dict[str, int] = assignments or {}

    @property
    def input_dim(self) -> int:
        return int(self.centers.shape[1])

    @property
    def size_bytes(self) -> int:
        return int(self.centers.nbytes)

    def nearest(self, vectors: Vectors) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
        """Each row's nearest centre and the distance to it."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.centers.shape[1]:
            raise PermanentError(
                f"expected vectors of dimension {self.centers.shape[1]}, got shape {x.shape}"
            )
        index, distance = [], []
        c_sq = (self.centers**2).sum(axis=1)
        for start in range(0, len(x), _PREDICT_BATCH_ROWS):
            chunk = x[start : start + _PREDICT_BATCH_ROWS]
            sq = (chunk**2).sum(axis=1)[:, None] - 2 * chunk @ self.centers.T + c_sq
            best = sq.argmin(axis=1)
            index.append(best)
            distance.append(np.sqrt(np.maximum(sq[np.arange(len(chunk)), best], 0)))
        if not index:
            return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.float32)
        return np.concatenate(index), np.concatenate(distance).astype(np.float32)

    def predict(self, vectors: Vectors) -> list[Prediction]:
        index, distance = self.nearest(vectors)
        return [
            Prediction(f"cluster-{i}", -float(d))
            for i, d in zip(index.tolist(), distance.tolist(), strict=True)
        ]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / CENTERS_FILE, self.centers, allow_pickle=False)
        config = {"task": self.task, "n_clusters": len(self.centers), "metrics": self.metrics}
        write_json(directory / CONFIG_FILE, config)

    @classmethod
    def load(cls, directory: Path) -> ClusteringModel:
        config = read_json(directory / CONFIG_FILE)
        centers = np.load(directory / CENTERS_FILE, allow_pickle=False)
        return cls(centers, {k: float(v) for k, v in config.get("metrics", {}).items()})


class ClusteringTrainer(TaskTrainer[ClusteringParams, Dataset, ClusteringModel]):
    task = "clustering"
    params_type = ClusteringParams

    def rows(self, data: Dataset, p: ClusteringParams) -> Dataset:
        need = max(p.min_rows, p.n_clusters + 1)
        if len(data) < need:
            raise PermanentError(
                f"too few rows: {len(data)}, need {need} for {p.n_clusters} clusters"
            )
        return data

    def fit(
        self, rows: Dataset, p: ClusteringParams, controls: TrainingControls
    ) -> ClusteringModel:
        init = _initial_centers(controls.warm_start, rows.dim, p.n_clusters)
        kmeans = MiniBatchKMeans(
            n_clusters=p.n_clusters,
            init="k-means++" if init is None else init,
            n_init=1,
            batch_size=p.batch_size,
            random_state=p.seed,
        )
        epochs_run = _fit(kmeans, rows.vectors, p, controls.on_epoch, controls.deadline)
        model = ClusteringModel(kmeans.cluster_centers_, {})
        index, distance = model.nearest(rows.vectors)
        model.assignments = dict(zip(rows.ids, index.tolist(), strict=True))
        model.metrics = {
            "inertia": float((distance.astype(np.float64) ** 2).sum()),
            "silhouette": _silhouette(rows.vectors, index, p),
            "epochs_run": float(epochs_run),
            "n_clusters": float(p.n_clusters),
            "warm_started": float(init is not None),
        }
        return model

    def load(self, directory: Path) -> ClusteringModel:
        return ClusteringModel.load(directory)


def _initial_centers(
    previous: TrainedModel | None, dim: int, n_clusters: int
) -> npt.NDArray[np.float32] | None:
    if isinstance(previous, ClusteringModel) and previous.centers.shape == (n_clusters, dim):
        return previous.centers.copy()
    return None


def _fit(
    kmeans: MiniBatchKMeans,
    vectors: Vectors,
    p: ClusteringParams,
    on_epoch: EpochCallback,
    deadline: Deadline,
) -> int:
    """Shuffled passes of ``partial_fit`` until the inertia settles; the passes made."""
    rng = np.random.default_rng(p.seed)
    # k-means++ seeds from the first batch, which must hold a row per cluster.
    batch_size = max(p.batch_size, p.n_clusters)
    started_s, previous = time.monotonic(), float("inf")
    epoch = 0
    for epoch in range(1, p.max_iter + 1):
        order = rng.permutation(len(vectors))
        for start in range(0, len(order), batch_size):
            deadline.check()
            kmeans.partial_fit(vectors[order[start : start + batch_size]])
        # score() is minus the inertia; per row so the curve is comparable across sizes.
        inertia = -float(kmeans.score(vectors)) / len(vectors)
        on_epoch(EpochReport(epoch, p.max_iter, inertia, None, eta_s(started_s, epoch, p.max_iter)))
        if epoch > 1 and previous - inertia <= p.tol * previous:
            break
        previous = inertia
    return epoch


def _silhouette(vectors: Vectors, index: npt.NDArray[np.intp], p: ClusteringParams) -> float:
    """Silhouette on at most ``silhouette_sample_size`` rows (it is quadratic); -1 when
    the rows fell into a single cluster, where it is undefined."""
    if len(np.unique(index)) < 2:
        return -1.0
    size = min(p.silhouette_sample_size, len(vectors))
    try:
        return float(silhouette_score(vectors, index, sample_size=size, random_state=p.seed))
    except ValueError:  # the sample drew a single cluster
        return -1.0
