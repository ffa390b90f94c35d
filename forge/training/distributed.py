"""Data-parallel classifier training: a request's ``resources`` asks for several ranks,
torch's elastic launcher (``torch.distributed.launcher.api.elastic_launch``, what
``torchrun`` runs) starts them on this machine, and DistributedDataParallel keeps their
weights in step: gloo between CPU processes, NCCL between GPUs.

Every rank builds the same split and initial weights from the seed and trains on its
DistributedSampler shard with ``ceil(batch_size / ranks)`` rows per step, so a step
still averages gradients over about ``batch_size`` rows. The ranks agree on everything
that ends a training: the epoch's loss (all-reduced), the validation predictions
(rank 0's, broadcast) and the deadline (any rank past it stops them all), so they stop
together. Rank 0 sends each epoch's report to the worker, which logs it to the
request's MLflow run and progress stream, and returns the model, which the worker
registers once, as for a one-process training.

A failed rank fails the training with a ``TransientError`` (the delivery is retried);
the launcher stops the other ranks, and each rank dies with the thread that started
it, so a worker killed outright leaves no rank behind.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from forge.errors import PermanentError, TransientError
from forge.events import Resources
from forge.training.base import (
    Dataset,
    Deadline,
    EpochCallback,
    EpochReport,
    TrainedModel,
    TrainingTimeout,
    coerce_params,
)
from forge.training.classifier import (
    ClassifierParams,
    ClassifierTrainer,
    TrainLoop,
    fit_epochs,
    loss_options,
    split_rows,
    trained_model,
    validation_metrics,
)
from forge.training.classifier_model import ClassifierModel, MLPHead
from forge.training.losses import get_loss

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

log = structlog.get_logger(__name__)

# Linux prctl option: the signal a process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1
_NEVER = Deadline(math.inf)


@dataclass(frozen=True, slots=True)
class Ranks:
    """How many ranks a training runs on, and whether they are GPUs."""

    count: int
    gpus: bool


def plan(task: str, resources: Resources | None) -> Ranks | None:
    """The ranks ``resources`` asks for; None for one process (today's path).
    ``PermanentError`` when this machine has fewer cores or GPUs than asked for."""
    if resources is None or (resources.processes or resources.gpus or 1) == 1:
        if resources is not None and resources.gpus and not torch.cuda.is_available():
            raise PermanentError("resources.gpus is 1 but this worker sees no GPU")
        return None
    if task != ClassifierTrainer.task:
        raise PermanentError(f"the {task} task cannot train on several processes or GPUs")
    if resources.gpus is not None:
        visible = torch.cuda.device_count()
        if resources.gpus > visible:
            raise PermanentError(f"resources.gpus is {resources.gpus}; this worker sees {visible}")
        return Ranks(resources.gpus, gpus=True)
    cores = os.cpu_count() or 1
    processes = resources.processes or 1
    if processes > cores:
        raise PermanentError(f"resources.processes is {processes}; this worker has {cores} cores")
    return Ranks(processes, gpus=False)


@dataclass(frozen=True)
class _Job:
    """What each rank is handed (pickled to it by the launcher)."""

    rows: Dataset
    labels: list[str]
    params: ClassifierParams
    warm_start: TrainedModel | None
    remaining_s: float
    gpus: bool


@dataclass(frozen=True, slots=True)
class _Failure:
    """A training that could not succeed, as every rank saw it: no retry helps."""

    timed_out: bool
    message: str


_DONE = "done"


def train(
    data: Dataset,
    params: Any,
    *,
    ranks: Ranks,
    warm_start: TrainedModel | None,
    on_epoch: EpochCallback,
    deadline: Deadline,
) -> ClassifierModel:
    """Train a classifier on ``ranks``; opens as ``TaskTrainer.train`` does."""
    p = coerce_params(params, ClassifierParams)
    rows, labels = ClassifierTrainer().rows(data, p)
    deadline.check()
    job = _Job(
        rows,
        labels,
        p,
        None if p.fresh else warm_start,
        deadline.at_s - deadline.clock(),
        ranks.gpus,
    )
    reports: Queue[EpochReport | str] = torch.multiprocessing.get_context("spawn").Queue()
    outcome: dict[str, Any] = {}
    # The launcher runs in a thread of its own: on the main thread it would replace the
    # worker's SIGTERM handler with its own.
    launcher = threading.Thread(
        target=_launch, args=(ranks, job, reports, outcome), name="forge-ddp-launcher"
    )
    launcher.start()
    failed: BaseException | None = None
    # Drained to the end whatever happens: rank 0 cannot exit while its reports are
    # unread, and the ranks end by themselves (finished, failed, past the deadline).
    while (report := reports.get()) != _DONE:
        assert isinstance(report, EpochReport)
        if failed is None:
            try:
                on_epoch(report)
            except BaseException as exc:
                failed = exc
    launcher.join()
    reports.close()
    if failed is not None:
        raise failed
    return _result(outcome)


def _launch(
    ranks: Ranks, job: _Job, reports: Queue[EpochReport | str], outcome: dict[str, Any]
) -> None:
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=ranks.count,
        run_id=f"forge-{uuid.uuid4()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        # A rank that dies fails the attempt; the delivery is retried, not the ranks.
        max_restarts=0,
        start_method="spawn",
    )
    try:
        outcome["ranks"] = elastic_launch(config, _run_rank)(job, reports)
    except BaseException as exc:
        outcome["error"] = exc
    finally:
        reports.put(_DONE)


def _result(outcome: dict[str, Any]) -> ClassifierModel:
    error = outcome.get("error")
    if isinstance(error, ChildFailedError):
        failed = ", ".join(
            f"rank {rank} exit code {failure.exitcode}"
            for rank, failure in sorted(error.failures.items())
        )
        raise TransientError(f"distributed training failed: {failed}") from error
    if error is not None:
        raise TransientError(f"distributed training failed: {error}") from error
    first = outcome["ranks"][0]
    if isinstance(first, _Failure):
        raise (TrainingTimeout if first.timed_out else PermanentError)(first.message)
    assert isinstance(first, ClassifierModel)
    return first


# ---------------------------------------------------------------------- in each rank


def _run_rank(job: _Job, reports: Queue[EpochReport | str]) -> ClassifierModel | _Failure | None:
    """A rank's entry point: rank 0 returns the model, the others None."""
    _die_with_launcher()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{local_rank}" if job.gpus else "cpu")
    if job.gpus:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if job.gpus else "gloo")
    try:
        model = _train_rank(job, device, reports if rank == 0 else None)
    except PermanentError as exc:
        return _Failure(isinstance(exc, TrainingTimeout), str(exc))
    finally:
        dist.destroy_process_group()
    return model if rank == 0 else None


def _die_with_launcher() -> None:
    """Ask Linux to SIGKILL this rank when the launcher thread ends (the worker killed
    included). torch's spawn asks for SIGINT, which a rank blocked in a collective
    (waiting on a peer, up to the process group's timeout) does not act on."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup remains
        log.debug("PR_SET_PDEATHSIG unavailable")


def _train_rank(
    job: _Job, device: torch.device, reports: Queue[EpochReport | str] | None
) -> ClassifierModel:
    p = job.params
    classes = sorted(set(job.labels))
    split = split_rows(job.rows, job.labels, classes, p)
    torch.manual_seed(p.seed)
    net = MLPHead(job.rows.dim, p.hidden_dim, len(classes), p.dropout)
    carried = ClassifierTrainer._warm_start(net, classes, p, job.warm_start)
    criterion = get_loss(p.loss, loss_options(p, split.y_train, len(classes)))
    loop = _RankLoop(net.to(device), criterion.to(device), p, device, job)

    def on_epoch(report: EpochReport) -> None:
        if reports is not None:
            reports.put(report)

    fit = fit_epochs(loop, split, on_epoch, _NEVER)
    net.load_state_dict(fit.state)
    loop.in_step = False
    metrics = validation_metrics(loop, split, fit, classes, carried)
    return trained_model(net, job.rows.dim, p, classes, metrics)


class _RankLoop(TrainLoop):
    """``TrainLoop`` for one rank: steps through DDP on this rank's shard, and agrees with
    the other ranks on the loss, the deadline and the validation predictions."""

    def __init__(
        self,
        net: MLPHead,
        criterion: torch.nn.Module,
        params: ClassifierParams,
        device: torch.device,
        job: _Job,
    ) -> None:
        super().__init__(net, criterion, params, device)
        self.ddp = DistributedDataParallel(net, device_ids=[device.index] if job.gpus else None)
        self.deadline = Deadline.after(job.remaining_s)
        self.rank_batch = math.ceil(params.batch_size / dist.get_world_size())
        self.epoch = 0
        # While the ranks train together, evaluation is rank 0's; afterwards local.
        self.in_step = True

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor, deadline: Deadline) -> float:
        self.net.train()  # the module DDP wraps: DDP's own train() is untyped
        sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
            TensorDataset(x, y), shuffle=True, seed=self.params.seed
        )
        sampler.set_epoch(self.epoch)
        self.epoch += 1
        total = torch.zeros(3, device=self.device)  # loss sum, rows, ranks past deadline
        for batch in torch.split(torch.tensor(list(sampler)), self.rank_batch):
            xb, yb = x[batch].to(self.device), y[batch].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                loss = self.criterion(self.ddp(xb), yb)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total[0] += loss.detach().float() * len(batch)
            total[1] += len(batch)
        total[2] = float(self.deadline.clock() > self.deadline.at_s)
        dist.all_reduce(total)
        if total[2] > 0:
            self.deadline.check()
            raise TrainingTimeout("another rank ran past the training's deadline")
        mean = float(total[0] / total[1])
        if not math.isfinite(mean):
            raise PermanentError(f"training diverged (loss {mean}); try a lower learning_rate")
        return mean

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        loss, predicted = super().evaluate(x, y)
        if not self.in_step:
            return loss, predicted
        head = torch.tensor([loss], dtype=torch.float64)
        shared = torch.cat([head, predicted.double()]).to(self.device)
        dist.broadcast(shared, src=0)
        shared = shared.cpu()
        return float(shared[0]), shared[1:].long()
