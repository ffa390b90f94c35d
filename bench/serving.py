"""Benchmark: online predictions, each door against its baseline in the same run.

    .venv/bin/python bench/serving.py [--duration-s 10] [--connections 4]
        [--stream-requests 5000] [--text-rows 2048] [--redis-url redis://127.0.0.1:6379/0]

In a fresh FORGE_HOME (embedded SQLite MLflow store) it registers two classifier
versions as a worker would: ``digits`` on scikit-learn's digits (64-d vectors) and
``tickets`` on sentences embedded with all-MiniLM-L6-v2. Then, on loopback:

* **HTTP**: ``forge serve`` (``POST /v1/models/digits/predict``) and ``mlflow models
  serve -m models:/digits@champion --env-manager local`` (``POST /invocations``) on
  the same registered version and the same vector rows, single-row and 32-row bodies,
  each under the same fixed-concurrency load (wrk when installed) for
  ``--duration-s``, interleaved. Targets: Forge >= 3x MLflow's single-row req/s, p99
  <= 10 ms at that load.
* **Stream**: ``--stream-requests`` one-row predict-requests through ``forge worker
  --stream predict-requests`` (decode, route, batch, predict, one prediction event and
  completion each, markers and acks in one transaction), against a hand-written
  raw redis-py loop doing the least the job needs (XREADGROUP 32, decode, one
  ``model.predict`` per read, XADD the answers, XACK) with the same model, and against
  the same loop also doing the Redis writes Forge makes per request (done marker,
  completion, prediction record and counters). Target >= 0.8x of the first; the
  second's own ratio to the first is printed too, the ceiling those writes put on any
  implementation. Run for ``digits`` (vectors) and then ``tickets`` (``--text-rows``
  texts, embedded per read).
* **Text**: 32-text bodies to ``forge serve`` (embedding + predict in the engine)
  against bare ``embedder.encode`` + ``model.predict`` on 32-text batches in this
  process. Target >= 0.9x rows/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import MODEL, log
from bench._loadgen import Load, run_bodies, run_load
from bench._serving_setup import (
    TEXT_MODEL,
    VECTOR_MODEL,
    digits_rows,
    forge_env,
    forge_serve,
    free_port,
    mlflow_serve,
    ticket_texts,
    train_models,
)
from forge.keys import Keys
from forge.settings import Settings


def main() -> int:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="forge-bench-serving-") as tmp:
        folder = Path(tmp)
        settings = Settings(
            redis_url=args.redis_url,
            home_dir=folder / "home",
            stream_prefix=f"bench-serving-{os.getpid()}:",
        )
        train_models(settings)
        rows: list[list[str]] = []
        parts = {"http": http_comparison, "text": text_comparison, "stream": stream_comparison}
        try:
            for name in args.only.split(","):
                rows += parts[name](settings, folder, args)
        finally:
            _cleanup(settings)
        _print(rows)
    return 0


# ---------------------------------------------------------------------------- HTTP


def http_comparison(settings: Settings, folder: Path, args: argparse.Namespace) -> list[list[str]]:
    vectors, _ = digits_rows()
    forge_port, mlflow_port = free_port(), free_port()
    rows: list[list[str]] = []
    with (
        forge_serve(settings, forge_port, folder),
        mlflow_serve(settings, VECTOR_MODEL, mlflow_port, folder),
    ):
        for n in (1, 32):
            batch = vectors[:n].tolist()
            forge_body = msgspec.json.encode({"inputs": [{"vector": v} for v in batch]})
            mlflow_body = msgspec.json.encode({"inputs": batch})
            forge_url = f"http://127.0.0.1:{forge_port}/v1/models/{VECTOR_MODEL}/predict"
            mlflow_url = f"http://127.0.0.1:{mlflow_port}/invocations"
            for url, body in ((forge_url, forge_body), (mlflow_url, mlflow_body)):
                _warm(url, body, args)
            forge = _load(forge_url, forge_body, args)
            mlflow = _load(mlflow_url, mlflow_body, args)
            rows.append(_http_row("forge serve", n, forge))
            rows.append(_http_row("mlflow models serve", n, mlflow))
            rows.append([f"ratio ({n}-row)", f"{forge.rps / mlflow.rps:.2f}x req/s", "", "", ""])
    return rows


def _warm(url: str, body: bytes, args: argparse.Namespace) -> None:
    """One blocking request, then a short load, before anything is timed."""
    _warm_once(url, body)
    run_load(url, body, connections=args.connections, duration_s=2, headers=_json())


def _warm_once(url: str, body: bytes) -> None:
    """The first request loads the model (and for texts the embedding model): seconds."""
    request = urllib.request.Request(url, body, _json())
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()


def _load(url: str, body: bytes, args: argparse.Namespace) -> Load:
    load = run_load(url, body, connections=args.connections, duration_s=args.duration_s,
                    headers=_json())  # fmt: skip
    log(f"{url}: {load.rps:.0f} req/s, p50 {load.p50_s * 1e3:.2f} ms, p99 "
        f"{load.p99_s * 1e3:.2f} ms, {load.errors} errors ({load.tool})")  # fmt: skip
    return load


def _http_row(name: str, n: int, load: Load) -> list[str]:
    return [
        f"{name} ({n}-row)",
        f"{load.rps:,.0f} req/s",
        f"{load.rps * n:,.0f} rows/s",
        f"p50 {load.p50_s * 1e3:.2f} ms / p99 {load.p99_s * 1e3:.2f} ms",
        f"{load.errors} errors",
    ]


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------- text


def text_comparison(settings: Settings, folder: Path, args: argparse.Namespace) -> list[list[str]]:
    """Every text is sent once (unique texts, so no embedding cache helps either side):
    the same fixed work, 32 texts per body, over ``--connections`` connections."""
    texts, _ = ticket_texts(args.text_rows + 32)
    warm, texts = texts[:32], texts[32:]
    batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    bare = _bare_text_rows_s(settings, warm, batches)
    port = free_port()
    with forge_serve(settings, port, folder):
        url = f"http://127.0.0.1:{port}/v1/models/{TEXT_MODEL}/predict"
        bodies = [msgspec.json.encode({"inputs": [{"text": t} for t in b]}) for b in batches]
        _warm_once(url, msgspec.json.encode({"inputs": [{"text": t} for t in warm]}))
        elapsed_s = run_bodies(url, bodies, connections=args.connections, headers=_json())
    served = len(texts) / elapsed_s
    log(f"text: bare {bare:,.0f} rows/s, forge serve {served:,.0f} rows/s")
    return [
        ["bare encode + predict (32 texts)", f"{bare:,.0f} rows/s", "", "", ""],
        ["forge serve (32 texts per body)", f"{served:,.0f} rows/s", "", "", ""],
        ["ratio (text)", f"{served / bare:.2f}x rows/s", "", "", ""],
    ]


def _bare_text_rows_s(settings: Settings, warm: list[str], batches: list[list[str]]) -> float:
    from forge.embedding.service import EmbeddingService
    from forge.training.service import TrainingService

    embedder = EmbeddingService.from_settings(settings, None).embedder(MODEL)
    model, _ = TrainingService.from_settings(settings).load(TEXT_MODEL)
    model.predict(embedder.encode(warm, 32))
    started = time.perf_counter()
    for batch in batches:
        model.predict(embedder.encode(batch, 32))
    return sum(map(len, batches)) / (time.perf_counter() - started)


# -------------------------------------------------------------------------- stream


def stream_comparison(
    settings: Settings, folder: Path, args: argparse.Namespace
) -> list[list[str]]:
    """Vector requests (``digits``: a model call of 32 rows takes tens of microseconds,
    so Redis work dominates), then text requests (``tickets``: the embedding model does
    real work per request, as most served models do)."""
    client = redis.Redis.from_url(str(settings.redis_url))
    vectors, _ = digits_rows()
    digits = [{"vector": v} for v in vectors.tolist()]
    # Texts the text comparison never sent: no embedding cache answers for the model.
    texts, _ = ticket_texts(2 * args.text_rows + 32)
    tickets = [{"text": t} for t in texts[args.text_rows + 32 :]]
    rows: list[list[str]] = []
    for model, inputs, n in ((VECTOR_MODEL, digits, args.stream_requests),
                             (TEXT_MODEL, tickets, len(tickets))):  # fmt: skip
        stream = _Stream(settings, client, model, inputs)
        raw = stream.raw_rows_s(n, "raw")
        same = stream.raw_rows_s(n, "same")
        forge = stream.forge_rows_s(n, folder)
        rows += [
            [f"raw redis-py loop + predict ({model})", f"{raw:,.0f} predictions/s"],
            [f"raw loop doing Forge's Redis work ({model})", f"{same:,.0f} predictions/s"],
            [f"forge worker --stream predict-requests ({model})", f"{forge:,.0f} predictions/s"],
            [f"ratio (stream, {model})", f"{forge / raw:.2f}x"],
            [f"ratio (stream, {model}, same work)", f"{forge / same:.2f}x"],
            # The ceiling the per-request writes put on any implementation.
            [f"ratio (same-work loop / raw loop, {model})", f"{same / raw:.2f}x"],
        ]
        rows = [row + [""] * (5 - len(row)) for row in rows]
    return rows


class _Stream:
    """One model's predict-requests, through a raw loop or a Forge worker."""

    def __init__(
        self, settings: Settings, client: redis.Redis, model: str, inputs: list[dict[str, Any]]
    ) -> None:
        self.settings, self.client, self.model, self.inputs = settings, client, model, inputs
        self.run = 0

    def publish(self, stream: str, n: int, start: int = 0) -> None:
        """All ``n`` requests in one MULTI: they appear at once, so both consumers read
        full batches from the start instead of racing the publisher. Ids are new per
        run, so that no embedding cache or done marker answers for the model."""
        self.run += 1
        pipe = self.client.pipeline(transaction=True)
        for i in range(start, start + n):
            event = {
                "type": "predict-request",
                "id": f"{self.model}-{self.run}-{i}",
                "model": self.model,
                "inputs": [self.inputs[i % len(self.inputs)]],
            }
            pipe.xadd(stream, {"event": msgspec.json.encode(event)})
        pipe.execute()

    def raw_rows_s(self, n: int, kind: str) -> float:
        """``raw``: the least the job needs. ``same``: also the Redis writes Forge makes
        per request (a done marker looked up and set, a completion beside the prediction,
        the prediction kept for the feedback join and its counters), as hand-written code
        would: pipelines of redis-py commands, the answers in one MULTI."""
        from forge.embedding.service import EmbeddingService
        from forge.training.service import TrainingService

        model, version = TrainingService.from_settings(self.settings).load(self.model)
        embed = None
        if version.embedding_model is not None:
            service = EmbeddingService.from_settings(self.settings, None)
            embedder = service.embedder(version.embedding_model)
            embed = embedder.encode
        prefix = f"{self.settings.stream_prefix}{kind}-{self.model}"
        stream, out = f"{prefix}-requests", f"{prefix}-out"
        self.client.xgroup_create(stream, "raw", id="0", mkstream=True)
        self.publish(stream, n)
        decoder = msgspec.json.Decoder()
        started, done = time.perf_counter(), 0
        while done < n:
            entries = self.client.xreadgroup("raw", "c1", {stream: ">"}, count=32, block=1000)
            for _, batch in entries:
                events = [decoder.decode(fields[b"event"]) for _, fields in batch]
                if kind == "same":
                    self.client.mget([f"{out}:done:{e['id']}" for e in events])
                first = [e["inputs"][0] for e in events]
                if embed is not None:
                    x = embed([i["text"] for i in first], 32)
                else:
                    x = np.asarray([i["vector"] for i in first], dtype=np.float32)
                answers = model.predict(x)
                self._answer(stream, out, batch, events, answers, same_work=kind == "same")
                done += len(batch)
        return n / (time.perf_counter() - started)

    def _answer(
        self, stream: str, out: str, batch: Any, events: list[Any], answers: Any, *,
        same_work: bool,
    ) -> None:  # fmt: skip
        # One MULTI for everything, the fewest round trips hand-written code can make.
        pipe = self.client.pipeline(transaction=True)
        if same_work:
            _record_same_work(pipe, out, self.model, events, answers)
        for event, answer in zip(events, answers, strict=True):
            answer_event = msgspec.json.encode(
                {"id": event["id"], "label": answer.label, "score": answer.score}
            )
            pipe.xadd(out, {"event": answer_event}, maxlen=100_000, approximate=True)
            if same_work:
                pipe.xadd(f"{out}:completions", {"event": answer_event}, maxlen=100_000,
                          approximate=True)  # fmt: skip
                pipe.set(f"{out}:done:{event['id']}", answer_event, ex=86_400)
        pipe.xack(stream, "raw", *[entry_id for entry_id, _ in batch])
        pipe.execute()

    def forge_rows_s(self, n: int, folder: Path) -> float:
        keys = Keys.from_settings(self.settings)
        args = [sys.executable, "-m", "forge", "worker", "--stream", "predict-requests",
                "--http-port", "0"]  # fmt: skip
        done = self.client.xlen(keys.predictions)
        with (folder / f"worker-{self.model}.log").open("wb") as out:
            env = forge_env(self.settings)
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=out)
            try:
                self.publish(keys.predict_requests, 1, start=n)  # warm-up: loads
                _wait_len(self.client, keys.predictions, done + 1, proc)
                started = time.perf_counter()
                self.publish(keys.predict_requests, n)
                _wait_len(self.client, keys.predictions, done + n + 1, proc)
                return n / (time.perf_counter() - started)
            finally:
                proc.terminate()
                proc.wait(timeout=60)


def _record_same_work(
    pipe: redis.client.Pipeline, out: str, model: str, events: list[Any], answers: Any
) -> None:
    for event, answer in zip(events, answers, strict=True):
        key = f"{out}:prediction:{event['id']}"
        record = msgspec.json.encode({"variant": "champion", "labels": [answer.label]})
        pipe.hset(key, mapping={"model": model, "1": record})
        pipe.expire(key, 86_400)
    pipe.hincrby(f"{out}:stats", "predictions", len(events))


def _wait_len(client: redis.Redis, stream: str, n: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while client.xlen(stream) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker stopped or stalled at {client.xlen(stream)}/{n}")
        time.sleep(0.005)


# ---------------------------------------------------------------------------- misc


def _cleanup(settings: Settings) -> None:
    client = redis.Redis.from_url(str(settings.redis_url))
    for key in client.scan_iter(f"{settings.stream_prefix}*", count=1000):
        client.delete(key)


def _print(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--stream-requests", type=int, default=5000)
    parser.add_argument("--text-rows", type=int, default=2048)  # unique texts, sent once
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--only", default="http,text,stream", help="comma-separated parts")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
