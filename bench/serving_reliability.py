"""Reliability of online predictions under change: promotions, a split change and a
killed server, all while requests keep coming.

    .venv/bin/python bench/serving_reliability.py [--duration-s 300] [--connections 4]

Registers three versions of ``digits`` (1 champion; 2 and 3 left unpromoted), starts
two ``forge serve`` processes and holds a fixed-concurrency load on each (threads on
keep-alive connections, single-row bodies, a routing key per request). During the run
it promotes version 2 at 1/4 of the duration, sets the split ``champion=80 3=20`` at
1/2, and promotes version 3 at 3/4, each with the ``forge`` command an operator would
use. At 85 % it SIGKILLs the second server, and restarts it.

It checks:
* zero failed requests on servers that were up (the killed server's refused
  connections are counted apart);
* every answer names a version that was the champion, or in the split, at some moment
  between the request's start (less one reload interval) and its answer;
* flat memory: the first server's RSS in the last tenth of the run is within 10 % of
  its RSS at the first tenth (after warm-up);
* the restarted server answers a prediction within a few seconds.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import log
from bench._serving_setup import VECTOR_MODEL, digits_rows, forge_env, free_port, wait_http
from forge.events import TrainingRequest
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import TrainingService


@dataclass
class Answer:
    sent_s: float
    done_s: float
    server: int
    ok: bool
    version: int = 0
    refused: bool = False


@dataclass
class Timeline:
    """Changes in order: (command started, command finished, versions allowed from
    then on). While a command runs, the versions before it and after it are both
    allowed: the alias moves at some moment inside it."""

    changes: list[tuple[float, float, frozenset[int]]] = field(default_factory=list)

    def allowed(self, start_s: float, end_s: float) -> frozenset[int]:
        allowed: set[int] = set()
        for i, (began, _, versions) in enumerate(self.changes):
            until = self.changes[i + 1][1] if i + 1 < len(self.changes) else float("inf")
            if began <= end_s and until >= start_s:
                allowed |= versions
        return frozenset(allowed)


def main() -> int:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="forge-bench-reliability-") as tmp:
        folder = Path(tmp)
        settings = Settings(redis_url=args.redis_url, home_dir=folder / "home",
                            stream_prefix=f"bench-rel-{os.getpid()}:")  # fmt: skip
        _train_versions(settings)
        try:
            return _run(settings, folder, args)
        finally:
            client = redis.Redis.from_url(args.redis_url)
            for key in client.scan_iter(f"{settings.stream_prefix}*", count=1000):
                client.delete(key)


def _train_versions(settings: Settings) -> None:
    service = TrainingService.from_settings(settings)
    x, y = digits_rows()
    data = Dataset(ids=[str(i) for i in range(len(y))], vectors=x,
                   metadata=[{"label": label} for label in y])  # fmt: skip
    for version, seed in ((1, 0), (2, 1), (3, 2)):
        request = TrainingRequest(
            id=f"rel-{version}", model=VECTOR_MODEL, task="classifier", collection="digits",
            params={"label_field": "label", "epochs": 10, "seed": seed},
            promote="always" if version == 1 else "never",
        )  # fmt: skip
        service.train(request, data)
    log("registered digits versions 1 (champion), 2 and 3")


def _start(settings: Settings, port: int, folder: Path) -> subprocess.Popen[bytes]:
    out = (folder / f"serve-{port}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge", "serve", "--port", str(port)],
        env=forge_env(settings), stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def _run(settings: Settings, folder: Path, args: argparse.Namespace) -> int:
    ports = [free_port(), free_port()]
    procs = [_start(settings, port, folder) for port in ports]
    timeline = Timeline([(0.0, 0.0, frozenset({1}))])
    answers: list[Answer] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=_client, args=(ports[s], s, t0, stop, answers, c))
        for s in range(2)
        for c in range(args.connections)
    ]
    for t in threads:
        t.start()
    rss = _script(settings, folder, args, procs, ports, timeline, t0)
    stop.set()
    for t in threads:
        t.join()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return _report(answers, timeline, rss, args)


def _script(
    settings: Settings, folder: Path, args: argparse.Namespace,
    procs: list[subprocess.Popen[bytes]], ports: list[int], timeline: Timeline, t0: float,
) -> dict[str, float]:  # fmt: skip
    duration = args.duration_s
    steps = [
        (0.25, ["models", "promote", VECTOR_MODEL, "2"], {2}),
        (0.50, ["models", "split", VECTOR_MODEL, "champion=80", "3=20"], {2, 3}),
        (0.75, ["models", "promote", VECTOR_MODEL, "3"], {3}),
    ]
    rss: dict[str, float] = {}
    first = psutil.Process(procs[0].pid)
    killed = False
    while (now := time.perf_counter() - t0) < duration:
        if steps and now >= steps[0][0] * duration:
            _, command, versions = steps.pop(0)
            before = time.perf_counter() - t0
            subprocess.run([sys.executable, "-m", "forge", *command], env=forge_env(settings),
                           check=True, capture_output=True)  # fmt: skip
            timeline.changes.append((before, time.perf_counter() - t0, frozenset(versions)))
            log(f"{now:6.1f}s forge {' '.join(command)}")
        if not killed and now >= 0.85 * duration:
            rss["restart_ready_s"] = _kill_and_restart(settings, procs, ports, folder)
            killed = True
        if now >= 0.1 * duration and "rss_first" not in rss:
            rss["rss_first"] = first.memory_info().rss
        if now >= 0.9 * duration:
            rss["rss_last"] = first.memory_info().rss
        time.sleep(0.1)
    return rss


def _kill_and_restart(
    settings: Settings, procs: list[subprocess.Popen[bytes]], ports: list[int], folder: Path
) -> float:
    procs[1].kill()
    procs[1].wait()
    log("killed the second server")
    started = time.perf_counter()
    procs[1] = _start(settings, ports[1], folder)
    ready = time.perf_counter() - started
    log(f"second server ready again after {ready:.1f}s")
    return ready


def _client(
    port: int, server: int, t0: float, stop: threading.Event, out: list[Answer], seed: int
) -> None:
    vectors, _ = digits_rows()
    decoder = msgspec.json.Decoder()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = seed
    while not stop.is_set():
        i += 1
        body = msgspec.json.encode(
            {"inputs": [{"vector": vectors[i % len(vectors)].tolist()}], "key": f"user-{i}"}
        )
        sent = time.perf_counter() - t0
        try:
            conn.request("POST", f"/v1/models/{VECTOR_MODEL}/predict", body,
                         {"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            payload = response.read()
        except OSError:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            out.append(Answer(sent, time.perf_counter() - t0, server, False, refused=True))
            time.sleep(0.05)
            continue
        done = time.perf_counter() - t0
        ok = response.status == 200
        version = int(decoder.decode(payload)["version"]) if ok else 0
        out.append(Answer(sent, done, server, ok, version))


def _report(
    answers: list[Answer], timeline: Timeline, rss: dict[str, float], args: argparse.Namespace
) -> int:
    reload_s = Settings().serve_reload_interval_s
    failed = [a for a in answers if not a.ok and not a.refused]
    refused = [a for a in answers if a.refused]
    wrong = [a for a in answers if a.ok and
             a.version not in timeline.allowed(a.sent_s - reload_s, a.done_s)]  # fmt: skip
    growth = rss["rss_last"] / rss["rss_first"] - 1
    checks = {
        "zero failed requests on live servers": not failed,
        "every answer from a version allowed at that moment": not wrong,
        "flat memory (RSS growth < 10 %)": growth < 0.10,
        "restarted server ready within 10 s": rss["restart_ready_s"] < 10,
    }
    by_version: dict[int, int] = {}
    for a in answers:
        if a.ok:
            by_version[a.version] = by_version.get(a.version, 0) + 1
    rate = len(answers) / args.duration_s
    print(f"requests: {len(answers):,} in {args.duration_s:.0f}s ({rate:,.0f}/s), "
          f"2 servers x {args.connections} connections")  # fmt: skip
    print(f"answers by version: {dict(sorted(by_version.items()))}")
    print(f"failed: {len(failed)}; refused while killed: {len(refused)}; "
          f"wrong version: {len(wrong)}")  # fmt: skip
    for a in wrong[:5]:  # when they were sent, against the changes' ends
        ends = ", ".join(f"{end:.3f}" for _, end, _ in timeline.changes)
        print(
            f"  wrong: version {a.version} from server {a.server}, sent {a.sent_s:.3f}s,"
            f" answered {a.done_s:.3f}s (changes ended at {ends})"
        )
    print(f"server RSS: {rss['rss_first'] / 2**20:.0f} MiB at 10 %, "
          f"{rss['rss_last'] / 2**20:.0f} MiB at 90 % ({growth:+.1%})")  # fmt: skip
    print(f"restart to ready: {rss['restart_ready_s']:.1f}s")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
