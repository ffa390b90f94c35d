"""Classification losses selectable by name in a training request's ``params.loss``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from forge.errors import PermanentError


@dataclass(frozen=True)
class LossOptions:
    """Knobs shared by the losses; each loss reads the ones it understands."""

    label_smoothing: float = 0.1
    focal_gamma: float = 2.0
    # Per-class weights indexed like the model's outputs, or None for equal weights.
    class_weights: torch.Tensor | None = None


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy scaled by ``(1 - p_t) ** gamma`` so
    confidently right rows count less and training focuses on the hard ones.

    With class weights the mean is weighted like ``nn.CrossEntropyLoss``'s
    (``sum(w_i * l_i) / sum(w_i)``), so gamma=0 reproduces weighted cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise PermanentError(f"focal_gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.weight: torch.Tensor | None
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Float32 even under autocast: (1 - p) ** gamma underflows in float16.
        log_p = F.log_softmax(logits.float(), dim=-1)
        log_p_t = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        losses = -((1 - log_p_t.exp()) ** self.gamma) * log_p_t
        if self.weight is None:
            return losses.mean()
        w = self.weight[target]
        return (w * losses).sum() / w.sum()


def _cross_entropy(options: LossOptions) -> nn.Module:
    return nn.CrossEntropyLoss(weight=options.class_weights)


def _label_smoothing(options: LossOptions) -> nn.Module:
    if not 0 <= options.label_smoothing < 1:
        raise PermanentError(f"label_smoothing must be in [0, 1), got {options.label_smoothing}")
    return nn.CrossEntropyLoss(
        weight=options.class_weights, label_smoothing=options.label_smoothing
    )


def _focal(options: LossOptions) -> nn.Module:
    return FocalLoss(gamma=options.focal_gamma, weight=options.class_weights)


LOSSES: dict[str, Callable[[LossOptions], nn.Module]] = {
    "cross_entropy": _cross_entropy,
    "label_smoothing": _label_smoothing,
    "focal": _focal,
}


def unknown_loss_message(name: str) -> str:
    return f"unknown loss {name!r} (known: {', '.join(LOSSES)})"


def get_loss(name: str, options: LossOptions | None = None) -> nn.Module:
    """The loss called ``name``; ``PermanentError`` if there is none."""
    factory = LOSSES.get(name)
    if factory is None:
        raise PermanentError(unknown_loss_message(name))
    return factory(options or LossOptions())
