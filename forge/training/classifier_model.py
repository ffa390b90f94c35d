"""The classifier task's model: an MLP head over embedding vectors, its pickle-free
on-disk form, and how an earlier version's weights seed a new one (warm start)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeGuard

import msgspec
import numpy as np
import structlog
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from forge.errors import PermanentError
from forge.training.base import Prediction, Vectors, read_json, write_json

log = structlog.get_logger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Used only where safetensors is not installed; read back with weights_only=True,
# which refuses anything but tensors and plain containers.
FALLBACK_WEIGHTS_FILE = "model.pt"
FORMAT_VERSION = 1
_PREDICT_BATCH_ROWS = 8192


class MLPHead(nn.Module):
    """vector -> hidden (ReLU, dropout) -> one logit per class."""

    def __init__(self, input_dim: int, hidden_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.output(self.dropout(F.relu(self.hidden(x))))
        return out


class ClassifierConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything besides the weights needed to rebuild a model (``config.json``)."""

    input_dim: int
    hidden_dim: int
    dropout: float
    labels: list[str]
    label_field: str
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    format_version: int = FORMAT_VERSION


class ClassifierModel:
    """A trained MLP head; lives on the CPU (a head is small, and the caller's cache
    and MLflow want host memory)."""

    task = "classifier"
    primary_metric = "val_macro_f1"

    def __init__(self, net: MLPHead, config: ClassifierConfig) -> None:
        self.net = net.cpu().eval()
        self.config = config
        self.metrics: dict[str, float] = dict(config.metrics)

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.net.state_dict().values())

    def predict(self, vectors: Vectors) -> list[Prediction]:
        """The most probable label of each row and its softmax probability."""
        x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.config.input_dim:
            raise PermanentError(
                f"expected vectors of dimension {self.config.input_dim}, got shape {tuple(x.shape)}"
            )
        predictions: list[Prediction] = []
        with torch.inference_mode():
            for chunk in torch.split(x, _PREDICT_BATCH_ROWS):
                score, index = F.softmax(self.net(chunk), dim=-1).max(dim=-1)
                predictions.extend(
                    Prediction(self.labels[i], s)
                    for i, s in zip(index.tolist(), score.tolist(), strict=True)
                )
        return predictions

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        _save_weights(state, directory)
        config = msgspec.structs.replace(self.config, metrics=self.metrics)
        write_json(directory / CONFIG_FILE, {"task": self.task, **msgspec.to_builtins(config)})

    @classmethod
    def load(cls, directory: Path) -> ClassifierModel:
        raw = read_json(directory / CONFIG_FILE)
        raw.pop("task", None)
        config = msgspec.convert(raw, ClassifierConfig)
        if config.format_version != FORMAT_VERSION:
            raise PermanentError(f"unsupported classifier format {config.format_version}")
        net = MLPHead(config.input_dim, config.hidden_dim, len(config.labels), config.dropout)
        net.load_state_dict(_load_weights(directory))
        return cls(net, config)


def transfer_weights(previous: ClassifierModel, net: MLPHead, labels: list[str]) -> int:
    """Seed ``net`` with ``previous``'s weights; return how many classes carried over.

    The hidden layer is copied whole. Output rows are matched by label: a class both
    versions know keeps its row, a new class keeps ``net``'s random row, and a class
    no longer in the data is dropped. Fine-tuning then starts from what the previous
    version learnt instead of from scratch.
    """
    old = previous.net.state_dict()
    with torch.no_grad():
        net.hidden.weight.copy_(old["hidden.weight"])
        net.hidden.bias.copy_(old["hidden.bias"])
        old_row = {label: i for i, label in enumerate(previous.labels)}
        kept = [(new, old_row[label]) for new, label in enumerate(labels) if label in old_row]
        for new, prior in kept:
            net.output.weight[new] = old["output.weight"][prior]
            net.output.bias[new] = old["output.bias"][prior]
    return len(kept)


def can_transfer(previous: object, input_dim: int, hidden_dim: int) -> TypeGuard[ClassifierModel]:
    """True when ``previous`` is a classifier whose layers fit the new network."""
    if not isinstance(previous, ClassifierModel):
        return False
    fits = (previous.config.input_dim, previous.config.hidden_dim) == (input_dim, hidden_dim)
    if not fits:
        log.warning(
            "warm start skipped: layer sizes differ",
            previous=(previous.config.input_dim, previous.config.hidden_dim),
            new=(input_dim, hidden_dim),
        )
    return fits


def _save_weights(state: dict[str, torch.Tensor], directory: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, directory / FALLBACK_WEIGHTS_FILE)
        return
    save_file(state, str(directory / WEIGHTS_FILE))


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_FILE).exists():
        from safetensors.torch import load_file

        return load_file(str(directory / WEIGHTS_FILE))
    if (directory / FALLBACK_WEIGHTS_FILE).exists():
        state: dict[str, torch.Tensor] = torch.load(
            directory / FALLBACK_WEIGHTS_FILE, map_location="cpu", weights_only=True
        )
        return state
    raise PermanentError(f"not a saved classifier: no weights in {directory}")
