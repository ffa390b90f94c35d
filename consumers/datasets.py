"""The rows a training request trains on, as the train and trial handlers load them."""

from __future__ import annotations

from forge.errors import PermanentError
from forge.events import TrainingRequest
from forge.training.base import Dataset
from forge.vectorstore import VectorStore


def load_dataset(store: VectorStore, request: TrainingRequest) -> tuple[Dataset, str | None]:
    """The request's rows (all of the collection, or ``record_ids``) and the embedding
    model that made their vectors: ``None`` unless it made every one.

    A collection records a model even when its vectors came ready (texts sent to it
    later are embedded with that model), so its rows say which vectors it made."""
    collection = store.collection(request.collection)
    if collection is None:
        raise PermanentError(f"collection {request.collection!r} does not exist")
    snapshot = store.load_collection(request.collection, request.record_ids)
    if not snapshot.ids:
        which = "none of the requested records are" if request.record_ids else "it is empty"
        raise PermanentError(f"nothing to train on in {request.collection!r}: {which}")
    data = Dataset(ids=snapshot.ids, vectors=snapshot.vectors, metadata=snapshot.metadata)
    embedded = snapshot.embedded_by(collection.model)
    return data, collection.model if embedded else None
