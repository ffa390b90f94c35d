"""Forge's event handlers. ``register`` is the ``forge.consumers`` entry point.

The engine (``forge``) never imports this package: ``forge worker`` finds
``register`` through the entry point (or ``--consumers module:function``) and calls
it with the worker's ``HandlerRegistry`` and context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consumers.deferred_index import stream_backlog
from consumers.feedback import FeedbackHandler
from consumers.model_turn import ModelTurn
from consumers.new_data import NewDataHandler
from consumers.new_data_stream import NewDataStream
from consumers.once import Once
from consumers.predict import PredictHandler
from consumers.reembed import ReembedHandler
from consumers.retrain import RetrainOnNewData
from consumers.training import TrainingHandler, progress_publisher
from consumers.tuning import TrialHandler, open_tuner
from forge.embedding.service import EmbeddingService
from forge.events import (
    Feedback,
    NewData,
    PredictRequest,
    Reembed,
    ReembedBatch,
    TrainingRequest,
    TuneTrial,
)
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec
from forge.runtime.retry import Retrier
from forge.servers.endpoints import open_vector_store
from forge.training.service import TrainingService
from forge.vectorstore import VectorStore

if TYPE_CHECKING:
    from forge.serving.engine import PredictionEngine


def register(handlers: HandlerRegistry, ctx: Context) -> None:
    """Register every Forge handler in ``handlers``."""
    embedding = EmbeddingService.from_settings(ctx.settings, ctx.redis, ctx.metrics)
    store = Once(lambda: open_store(ctx))
    # Trained models share the embedders' byte budget (MODEL_CACHE_SIZE).
    training = Once(
        lambda: TrainingService.from_settings(
            ctx.settings, embedding.models, progress_publisher(ctx)
        )
    )
    # The stream's backlog tells the end of a large first load (deferred HNSW index).
    backlog = stream_backlog(ctx.redis, ctx.settings.group)
    # The reads a worker holds at once (FORGE_EMBED_READS_IN_FLIGHT) take turns in the model.
    turn = ModelTurn()
    new_data = NewDataHandler(ctx.settings, store, embedding, backlog, turn)
    versions = Once(lambda: training().versions)
    retraining = RetrainOnNewData(new_data, ctx.keys, versions)
    stream = NewDataStream(retraining, ReembedHandler(ctx.settings, store, embedding, turn))
    # Several model batches per read, so writing one overlaps embedding the next; and
    # several reads in flight, so the last write of one overlaps embedding the next.
    embed = HandlerSpec(
        "new-data",
        NewData,
        stream,
        name="embed",
        max_batch_size=ctx.settings.embed_read_size,
        concurrency=ctx.settings.embed_reads_in_flight,
        also=(Reembed, ReembedBatch),
    )
    handlers.register(embed)
    tuner = Once(lambda: open_tuner(ctx, store, training))
    trainer = TrainingHandler(ctx, store, training, tuner)
    # One request per batch, FORGE_TRAINING_CONCURRENCY batches at once: a worker holds
    # no requests it is not working on.
    spec = HandlerSpec(
        "training-requests",
        TrainingRequest,
        trainer,
        name="train",
        max_batch_size=1,
        concurrency=ctx.settings.training_concurrency,
    )
    handlers.register(spec)
    # The trials of hyperparameter searches, one at a time too.
    trials = TrialHandler(store, tuner)
    handlers.register(HandlerSpec("trials", TuneTrial, trials, name="trial", max_batch_size=1))
    # MLflow only once a model under `promote: on-significance` gets feedback.
    feedback = FeedbackHandler(ctx, versions)
    handlers.register(HandlerSpec("feedback", Feedback, feedback, name="feedback"))
    # The engine, and with it MLflow and torch, on the first predict request.
    engine = Once(lambda: open_engine(ctx, training(), embedding))
    door = PredictHandler(ctx, engine)
    predict = HandlerSpec("predict-requests", PredictRequest, door, name="predict")
    handlers.register(predict)


def open_engine(
    ctx: Context, training: TrainingService, embedding: EmbeddingService
) -> PredictionEngine:
    """The prediction engine ``forge serve`` runs, on the worker's Redis, models and
    metrics: trained and embedding models share one byte budget."""
    from forge.serving.engine import PredictionEngine

    return PredictionEngine.from_settings(
        ctx.settings, ctx.redis, ctx.metrics.serving, training=training, embedding=embedding
    )


def open_store(ctx: Context) -> VectorStore:
    """Connect to PostgreSQL (embedded when ``POSTGRES_URL`` is unset) and migrate."""
    # A worker whose first connection falls in a database outage waits for the server
    # (as an open pool waits for a connection) instead of failing at once: that would
    # spend an event's deliveries within seconds and dead-letter a valid event for an
    # outage. One-shot commands (`forge search`) still fail fast.
    wait = Retrier(
        attempts=1_000, initial_s=0.5, max_s=5.0, max_total_s=ctx.settings.db_connect_wait_s
    )
    return open_vector_store(ctx.settings, ctx.on_close, connect=wait.call)
