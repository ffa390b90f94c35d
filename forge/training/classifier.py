"""The ``classifier`` task: fine-tune an MLP head over a collection's vectors to predict
a metadata field, with early stopping on a held-out split."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import structlog
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from msgspec import Meta
from torch import nn

from forge.errors import PermanentError
from forge.training.base import (
    Dataset,
    Deadline,
    EpochCallback,
    EpochReport,
    Labelled,
    TaskTrainer,
    TrainedModel,
    TrainerParams,
    TrainingControls,
    coerce_params,
    eta_s,
    require_labels,
)
from forge.training.classifier_model import (
    ClassifierConfig,
    ClassifierModel,
    MLPHead,
    can_transfer,
    transfer_weights,
)
from forge.training.losses import LOSSES, LossOptions, get_loss, unknown_loss_message
from forge.training.validation import classification_metrics, stratified_split

log = structlog.get_logger(__name__)


class ClassifierParams(TrainerParams, frozen=True, kw_only=True, forbid_unknown_fields=True):
    label_field: str
    hidden_dim: Annotated[int, Meta(ge=1, le=65_536)] = 256
    epochs: Annotated[int, Meta(ge=1, le=100_000)] = 50
    batch_size: Annotated[int, Meta(ge=1)] = 64
    learning_rate: Annotated[float, Meta(gt=0)] = 1e-3
    weight_decay: Annotated[float, Meta(ge=0)] = 0.01
    dropout: Annotated[float, Meta(ge=0, lt=1)] = 0.1
    validation_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.2
    # Epochs without a better validation loss before stopping.
    patience: Annotated[int, Meta(ge=1)] = 5
    loss: str = "cross_entropy"
    label_smoothing: Annotated[float, Meta(ge=0, lt=1)] = 0.1
    focal_gamma: Annotated[float, Meta(ge=0)] = 2.0
    # "balanced" weighs each class by n_rows / (n_classes * class_rows).
    class_weights: Literal["none", "balanced"] = "none"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(unknown_loss_message(self.loss))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_FLOAT_BYTES = 4
_EVAL_CHUNK_ROWS = 8192


def memory_need_bytes(input_dim: int, hidden_dim: int, classes: int, batch_size: int) -> int:
    """GPU memory one classifier training needs, for GPU admission (in bytes):

    * parameters ``P = input_dim*hidden_dim + hidden_dim + hidden_dim*classes + classes``;
      weights, gradients and AdamW's two moments in float32, plus the float16 copies
      autocast makes: ``18 * P``;
    * activations, the larger of a training step (inputs, hidden pre-activations,
      ReLU outputs, dropout masks and logits, each kept for the backward pass and
      matched by a gradient: ``2 * 4 * batch_size * (input_dim + 3*hidden_dim +
      2*classes)``) and an evaluation chunk of 8192 rows
      (``4 * 8192 * (input_dim + hidden_dim + classes)``).

    The CUDA context and allocator slack are not in it: ``FORGE_GPU_ADMISSION_HEADROOM``
    covers them."""
    params = input_dim * hidden_dim + hidden_dim + hidden_dim * classes + classes
    state = (4 * _FLOAT_BYTES + 2) * params
    step = 2 * _FLOAT_BYTES * batch_size * (input_dim + 3 * hidden_dim + 2 * classes)
    evaluation = _FLOAT_BYTES * _EVAL_CHUNK_ROWS * (input_dim + hidden_dim + classes)
    return state + max(step, evaluation)


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass
class FitResult:
    """The best epoch so far (by validation loss) and how training went."""

    state: dict[str, torch.Tensor]
    val_loss: float = float("inf")
    train_loss: float = float("nan")
    best_epoch: int = 0
    epochs_run: int = 0


class TrainLoop:
    """One training run's optimiser state; mixed precision on CUDA only."""

    def __init__(
        self, net: MLPHead, criterion: nn.Module, params: ClassifierParams, device: torch.device
    ) -> None:
        self.net, self.criterion, self.params, self.device = net, criterion, params, device
        self.amp = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor, deadline: Deadline) -> float:
        """One pass in shuffled mini-batches; the mean training loss."""
        self.net.train()
        # Summed on the device: reading each batch's loss would wait for the GPU.
        total, order = torch.zeros((), device=self.device), torch.randperm(len(x))
        for batch in torch.split(order, self.params.batch_size):
            deadline.check()
            xb, yb = x[batch].to(self.device), y[batch].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                loss = self.criterion(self.net(xb), yb)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total += loss.detach().float() * len(batch)
        mean = float(total) / len(x)
        if not math.isfinite(mean):
            raise PermanentError(f"training diverged (loss {mean}); try a lower learning_rate")
        return mean

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Plain cross-entropy (comparable whatever the training loss) and predictions."""
        self.net.eval()
        logits = []
        with torch.inference_mode():
            for batch in torch.split(x, 8192):
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    logits.append(self.net(batch.to(self.device)).float())
            out = torch.cat(logits).cpu()
        return float(F.cross_entropy(out, y)), out.argmax(dim=-1)


class ClassifierTrainer(TaskTrainer[ClassifierParams, Labelled, ClassifierModel]):
    task = "classifier"
    params_type = ClassifierParams

    def rows(self, data: Dataset, p: ClassifierParams) -> Labelled:
        return require_labels(data, p.label_field, min_rows=p.min_rows)

    def fit(
        self, rows: Labelled, p: ClassifierParams, controls: TrainingControls
    ) -> ClassifierModel:
        labelled, labels = rows
        classes = sorted(set(labels))
        split = split_rows(labelled, labels, classes, p)
        device = torch.device(controls.device) if controls.device else default_device()
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(p.seed)
            net = MLPHead(labelled.dim, p.hidden_dim, len(classes), p.dropout)
            carried = self._warm_start(net, classes, p, controls.warm_start)
            criterion = get_loss(p.loss, loss_options(p, split.y_train, len(classes)))
            loop = TrainLoop(net.to(device), criterion.to(device), p, device)
            fit = fit_epochs(loop, split, controls.on_epoch, controls.deadline)
            net.load_state_dict(fit.state)
        metrics = validation_metrics(loop, split, fit, classes, carried)
        return trained_model(net, labelled.dim, p, classes, metrics)

    def load(self, directory: Path) -> ClassifierModel:
        return ClassifierModel.load(directory)

    def gpu_memory_bytes(self, data: Dataset, params: object) -> int | None:
        p = coerce_params(params, ClassifierParams)
        _, labels = data.labels(p.label_field)
        classes = max(len(set(labels)), 2)
        return memory_need_bytes(data.dim, p.hidden_dim, classes, p.batch_size)

    @staticmethod
    def _warm_start(
        net: MLPHead, classes: list[str], p: ClassifierParams, previous: TrainedModel | None
    ) -> int | None:
        """Classes carried over from ``previous``, or None when training from scratch."""
        if previous is None or not can_transfer(previous, net.hidden.in_features, p.hidden_dim):
            return None
        carried = transfer_weights(previous, net, classes)
        log.info("warm start", classes_carried=carried, classes=len(classes))
        return carried


def trained_model(
    net: MLPHead, input_dim: int, p: ClassifierParams, classes: list[str], metrics: dict[str, float]
) -> ClassifierModel:
    """The model a training made: ``net`` with the config that loads it again."""
    config = ClassifierConfig(
        input_dim=input_dim,
        hidden_dim=p.hidden_dim,
        dropout=p.dropout,
        labels=classes,
        label_field=p.label_field,
        metrics=metrics,
    )
    return ClassifierModel(net, config)


def split_rows(data: Dataset, labels: list[str], classes: list[str], p: ClassifierParams) -> Split:
    train, val = stratified_split(labels, p.validation_fraction, p.seed)
    index = {label: i for i, label in enumerate(classes)}
    x = torch.from_numpy(np.ascontiguousarray(data.vectors, dtype=np.float32))
    y = torch.tensor([index[label] for label in labels], dtype=torch.long)
    t, v = torch.from_numpy(train), torch.from_numpy(val)
    return Split(x[t], y[t], x[v], y[v])


def _rng_devices(device: torch.device) -> list[int]:
    # fork_rng restores the global RNGs afterwards, so seeding here leaves callers'
    # randomness alone; on CUDA the GPU's generator is forked too.
    return [torch.cuda.current_device()] if device.type == "cuda" else []


def loss_options(p: ClassifierParams, y_train: torch.Tensor, n_classes: int) -> LossOptions:
    weights = None
    if p.class_weights == "balanced":
        counts = torch.bincount(y_train, minlength=n_classes).float().clamp(min=1)
        weights = len(y_train) / (n_classes * counts)
    return LossOptions(
        label_smoothing=p.label_smoothing, focal_gamma=p.focal_gamma, class_weights=weights
    )


def fit_epochs(
    loop: TrainLoop, split: Split, on_epoch: EpochCallback, deadline: Deadline
) -> FitResult:
    """Train until ``epochs`` or ``patience`` epochs without a better validation loss."""
    p, started_s = loop.params, time.monotonic()
    fit = FitResult(state=_snapshot(loop.net))
    for epoch in range(1, p.epochs + 1):
        deadline.check()
        train_loss = loop.train_epoch(split.x_train, split.y_train, deadline)
        val_loss, predicted = loop.evaluate(split.x_val, split.y_val)
        fit.epochs_run = epoch
        if val_loss < fit.val_loss:
            fit.state, fit.val_loss, fit.train_loss, fit.best_epoch = (
                _snapshot(loop.net),
                val_loss,
                train_loss,
                epoch,
            )
        accuracy = float((predicted == split.y_val).float().mean())
        on_epoch(
            EpochReport(epoch, p.epochs, train_loss, accuracy, eta_s(started_s, epoch, p.epochs))
        )
        if epoch - fit.best_epoch >= p.patience:
            break
    return fit


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def validation_metrics(
    loop: TrainLoop, split: Split, fit: FitResult, classes: list[str], carried: int | None
) -> dict[str, float]:
    val_loss, predicted = loop.evaluate(split.x_val, split.y_val)
    truth = [classes[i] for i in split.y_val.tolist()]
    metrics = classification_metrics(truth, [classes[i] for i in predicted.tolist()])
    metrics.update(
        train_loss=fit.train_loss,
        val_loss=val_loss,
        epochs_run=float(fit.epochs_run),
        best_epoch=float(fit.best_epoch),
        warm_start_classes=float(carried or 0),
    )
    return metrics
