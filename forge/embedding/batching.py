"""Model batches bounded by a token budget: texts sorted longest first, so each batch
pads to lengths close to its own, and no batch holds more padded tokens than the budget
or more texts than ``MAX_BATCH_SIZE``.

A batch's cost (time, and activation memory on a GPU) follows its padded size, the
number of texts times the longest one, not its count of texts: a fixed count either
starves the model on short texts or overflows memory on long ones.
"""

from __future__ import annotations

from collections.abc import Sequence


def token_batches(lengths: Sequence[int], *, max_tokens: int, max_texts: int) -> list[list[int]]:
    """Indices into ``lengths`` (token counts), grouped into batches, longest first.

    Each batch holds at most ``max_texts`` indices and at most ``max_tokens`` padded
    tokens (its size times its longest length); a text longer than the budget alone
    goes in a batch of its own. Equal lengths keep their input order, so the batches
    are the same for the same input.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if max_texts <= 0:
        raise ValueError(f"max_texts must be positive, got {max_texts}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in order:
        # Sorted longest first, so the batch's first text sets its padded length.
        longest = lengths[batch[0]] if batch else lengths[index]
        if batch and (len(batch) == max_texts or (len(batch) + 1) * longest > max_tokens):
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches
