"""A call's inputs as model rows: vectors checked once per call, texts embedded with
the embedding model of the version that scores them, and the rows of every call a
version scores in a batch stacked for one model call.

Whatever is wrong with one call's inputs is that call's ``PredictError``; the other
calls of the batch are scored as if it had not been there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from forge.events import PredictInput
from forge.serving.calls import FAILED, PredictError

Matrix = npt.NDArray[np.float32]
# Embeds texts with the named embedding model: one float32 row per text.
Embed = Callable[[str, list[str]], Matrix]


@dataclass(frozen=True, slots=True)
class Inputs:
    """One call's inputs: its vectors as float32 rows and its texts, each with the
    positions they hold among the call's inputs."""

    size: int
    vectors: Matrix | None
    vector_at: list[int]
    texts: list[str]
    text_at: list[int]


def check_inputs(inputs: Sequence[PredictInput], max_text_chars: int) -> Inputs:
    """``inputs`` checked for what does not depend on the version: one dimension, finite
    numbers (in float32: 1e39 is not), texts no longer than ``max_text_chars``."""
    if not inputs:
        raise PredictError("no inputs: give at least one")
    vectors = [i.vector for i in inputs if i.vector is not None]
    texts = [i.text for i in inputs if i.text is not None]
    matrix = _vectors(vectors) if vectors else None
    for text in texts:
        if len(text) > max_text_chars:
            raise PredictError(f"a text has {len(text)} characters, more than {max_text_chars}")
    if not texts:
        return Inputs(len(inputs), matrix, list(range(len(inputs))), [], [])
    vector_at = [n for n, i in enumerate(inputs) if i.vector is not None]
    text_at = [n for n, i in enumerate(inputs) if i.text is not None]
    return Inputs(len(inputs), matrix, vector_at, texts, text_at)


def _vectors(vectors: list[list[float]]) -> Matrix:
    if len({len(v) for v in vectors}) > 1:
        raise PredictError("inputs have mixed dimensions: every vector needs the same length")
    with np.errstate(over="ignore"):
        matrix = np.array(vectors, dtype=np.float32)
    if matrix.shape[1] == 0:
        raise PredictError("a vector needs at least one number")
    if not np.isfinite(matrix).all():
        raise PredictError("vectors must hold finite float32 numbers: no NaN or infinity")
    return matrix


def stack(
    entries: Sequence[Inputs], embedding_model: str | None, embed: Embed, label: str
) -> list[Matrix | PredictError]:
    """Each entry's rows for a version whose texts ``embedding_model`` embeds (None:
    the version takes vectors only); ``label`` names the version in messages."""
    out: list[Matrix | PredictError] = []
    wanted = [e for e in entries if e.texts and embedding_model is not None]
    embedded = _embed_all(wanted, embedding_model, embed) if wanted else {}
    for entry in entries:
        if not entry.texts:
            assert entry.vectors is not None
            out.append(entry.vectors)
        elif embedding_model is None:
            out.append(PredictError(f"{label} takes vectors, not texts: it was trained on vectors"))
        else:
            out.append(_merge(entry, embedded[id(entry)]))
    return out


def _embed_all(
    entries: list[Inputs], model: str | None, embed: Embed
) -> dict[int, Matrix | PredictError]:
    """The texts of every entry in one embedding call."""
    assert model is not None
    texts = [t for e in entries for t in e.texts]
    try:
        vectors = embed(model, texts)
    except Exception as exc:
        error = PredictError(f"embedding model {model!r} failed: {type(exc).__name__}", FAILED)
        return {id(e): error for e in entries}
    out: dict[int, Matrix | PredictError] = {}
    start = 0
    for entry in entries:
        out[id(entry)] = vectors[start : start + len(entry.texts)]
        start += len(entry.texts)
    return out


def _merge(entry: Inputs, embedded: Matrix | PredictError) -> Matrix | PredictError:
    if isinstance(embedded, PredictError) or entry.vectors is None:
        return embedded
    if entry.vectors.shape[1] != embedded.shape[1]:
        return PredictError(
            f"inputs have mixed dimensions: vectors of {entry.vectors.shape[1]}, texts embed"
            f" to {embedded.shape[1]}"
        )
    rows = np.empty((entry.size, embedded.shape[1]), dtype=np.float32)
    rows[entry.vector_at] = entry.vectors
    rows[entry.text_at] = embedded
    return rows


def wrong_dimension(expected: int, rows: Matrix) -> PredictError:
    # The models' own wording, so that a command says the same through a server.
    return PredictError(f"expected vectors of dimension {expected}, got shape {rows.shape}")
