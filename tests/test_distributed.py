"""Data-parallel classifier training (``resources``): the ranks torch's elastic launcher
starts, what a worker registers from them, and what a killed rank leaves behind.

Accuracy tolerance: a 2-process (gloo) training's validation accuracy is within
``ACCURACY_TOLERANCE`` (0.05, absolute) of the one-process training of the same
request. The ranks see the rows in another order (DistributedSampler's shuffle) and
average gradients over ``ceil(batch_size / 2)`` rows a rank, so the two runs agree
closely but not bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np
import psutil
import pytest
from sklearn.datasets import load_digits

from forge.errors import PermanentError, TransientError, is_transient
from forge.events import Resources, TrainingProgress, TrainingRequest, Tune
from forge.runtime.context import Context
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.distributed import Ranks, plan
from forge.training.service import TrainingService
from forge.training.tracking import connect
from forge.training.versions import ModelVersions
from forge.vectorstore import VectorStore
from tests.test_training import CLASSIFIER, load_rows, model_versions, read, request, train

ACCURACY_TOLERANCE = 0.05
REPO = Path(__file__).resolve().parents[1]
TWO = {"processes": 2}


@pytest.fixture
def settings(settings: Settings, mlflow_uri: str, pg_url: str) -> Settings:
    return settings.replace(mlflow_tracking_uri=mlflow_uri, postgres_url=pg_url)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    data = load_digits()
    vectors = (data.data / 16.0).astype(np.float32)
    metadata = [{"digit": int(label)} for label in data.target]
    return Dataset([f"d{i}" for i in range(len(vectors))], vectors, metadata)


# ---------------------------------------------------------------------- plan


def test_one_process_or_none_keeps_the_single_process_path() -> None:
    assert plan("classifier", None) is None
    assert plan("classifier", Resources(processes=1)) is None
    assert plan("clustering", Resources(processes=1)) is None


def test_several_processes_run_as_cpu_ranks() -> None:
    assert plan("classifier", Resources(processes=2)) == Ranks(2, gpus=False)


@pytest.mark.parametrize(
    ("task", "resources", "match"),
    [
        ("classifier", Resources(processes=(os.cpu_count() or 1) + 1), "this worker has"),
        ("classifier", Resources(gpus=64), "this worker sees"),
        ("clustering", Resources(processes=2), "cannot train on several"),
    ],
)
def test_more_than_the_worker_has_is_permanent(task: str, resources: Resources, match: str) -> None:
    with pytest.raises(PermanentError, match=match):
        plan(task, resources)


@pytest.mark.parametrize(
    ("resources", "match"),
    [
        ({"processes": 0}, "processes"),
        ({"processes": 2, "gpus": 1}, "not both"),
        ({"cpus": 2}, "unknown field"),
    ],
)
def test_bad_resources_do_not_decode(resources: dict[str, Any], match: str) -> None:
    event = {"model": "m", "task": "classifier", "collection": "c", "resources": resources}
    with pytest.raises(msgspec.ValidationError, match=match):
        msgspec.convert(event, TrainingRequest)


def test_a_search_refuses_several_ranks() -> None:
    from forge.training.tuning.search import TuneService

    search = TuneService(Settings(), cast(Any, None), cast(Any, None))
    event = TrainingRequest(
        id="r1",
        model="m",
        task="classifier",
        collection="c",
        params={"label_field": "digit"},
        tune=Tune(trials=2),
        resources=Resources(processes=2),
    )
    with pytest.raises(PermanentError, match="leave out `resources`"):
        search.plan(event)


# ---------------------------------------------------------------------- ranks


@pytest.mark.slow
def test_two_processes_match_one_and_register_one_version(
    ctx: Context, vector_store: VectorStore, collection_name: str, model: str, digits: Dataset
) -> None:
    labels = [m["digit"] for m in digits.metadata]
    load_rows(vector_store, collection_name, digits.vectors, labels)
    single = train(ctx, request("one", f"{model}_1", collection_name))
    done = train(ctx, request("two", model, collection_name, resources=TWO))

    assert done.status == "succeeded", done.error
    accuracy = done.result["metrics"]["val_accuracy"]
    assert abs(accuracy - single.result["metrics"]["val_accuracy"]) <= ACCURACY_TOLERANCE
    assert len(ModelVersions(connect(ctx.settings)).all(model)) == 1
    assert [v.model_version for v in model_versions(ctx) if v.model == model] == [1]
    progress = [
        p for p in read(ctx, ctx.keys.training_progress, TrainingProgress) if p.source_id == "two"
    ]
    # Rank 0 alone reports: one event per epoch, not one per rank.
    assert [p.epoch for p in progress] == list(range(1, len(progress) + 1))


def _ranks_of(pid: int) -> list[psutil.Process]:
    """The training ranks among ``pid``'s descendants: the launcher's spawned processes
    (multiprocessing's resource tracker, also a child, is not one)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_a_killed_rank_fails_the_attempt_leaves_no_rank_and_a_retry_registers(
    settings: Settings, model: str, digits: Dataset
) -> None:
    ranks: list[psutil.Process] = []

    def kill_a_rank(progress: TrainingProgress) -> None:
        if not ranks:
            ranks.extend(_ranks_of(os.getpid()))
            ranks[-1].send_signal(signal.SIGKILL)

    # Far more epochs than can run before the kill lands: the training cannot end first.
    params = {**CLASSIFIER, "hidden_dim": 16, "epochs": 100_000, "patience": 100_000}
    event = TrainingRequest(
        id="r1",
        model=model,
        task="classifier",
        collection="c",
        params=params,
        resources=Resources(processes=2),
        timeout_s=120,  # only if the kill failed to stop it
    )
    service = TrainingService.from_settings(settings, progress=kill_a_rank)
    with pytest.raises(TransientError, match="distributed training failed") as failed:
        service.fit(event, digits)

    assert is_transient(failed.value)  # the runtime retries it, then Redis redelivers
    assert len(ranks) == 2
    assert not [r.pid for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
    assert _ranks_of(os.getpid()) == []
    assert service.versions.latest(model) is None

    # The redelivery, shortened so that it ends.
    retry = msgspec.structs.replace(event, params={**CLASSIFIER, "hidden_dim": 16, "epochs": 3})
    fitted, registered = TrainingService.from_settings(settings).train(
        retry, digits, redelivery=True
    )
    assert registered.version.version == 1
    assert len(service.versions.all(model)) == 1
    assert service.client.get_run(fitted.run.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_killed_worker_leaves_no_rank_behind() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.support.ddp_worker"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        pids = [int(pid) for pid in worker.stdout.readline().split()]
        assert len(pids) == 2, pids
        ranks = [psutil.Process(pid) for pid in pids]
        worker.send_signal(signal.SIGKILL)  # no cleanup code of the worker runs
        worker.wait()
        # The kernel kills the ranks when their launcher thread dies (PR_SET_PDEATHSIG);
        # the timeout only bounds the test if that failed.
        _, alive = psutil.wait_procs(ranks, timeout=60)
        assert alive == []
    finally:
        worker.kill()
        worker.wait()
