"""HTTP load at a fixed concurrency: wrk when it is installed, else a bounded Python
generator (threads on keep-alive connections), so the same comparison runs anywhere.

Both report requests/s and latency percentiles over one fixed-length run. wrk is the
better instrument (its own C event loop takes less CPU from the servers under test on
a small machine); the fallback says so in its ``tool`` field.
"""

from __future__ import annotations

import http.client
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class Load:
    tool: str
    requests: int
    errors: int
    duration_s: float
    p50_s: float
    p99_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s


def run_load(
    url: str, body: bytes, *, connections: int, duration_s: float, headers: dict[str, str]
) -> Load:
    if shutil.which("wrk"):
        return _wrk(url, body, connections=connections, duration_s=duration_s, headers=headers)
    return _threads(url, body, connections=connections, duration_s=duration_s, headers=headers)


def _wrk(
    url: str, body: bytes, *, connections: int, duration_s: float, headers: dict[str, str]
) -> Load:
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{body.decode()}]==]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    # Count non-2xx answers: wrk reports them only as a total line.
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    threads = min(connections, 2)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration_s)}s", "--latency",
         "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    Path(script.name).unlink()
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    failed = int(errors.group(1)) if errors else 0
    if socket_errors:
        failed += sum(int(g) for g in socket_errors.groups())
    return Load("wrk", requests, failed, duration_s, _wrk_pct(out, "50%"), _wrk_pct(out, "99%"))


def _wrk_pct(out: str, label: str) -> float:
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    if match is None:
        raise RuntimeError(f"no {label} latency in wrk's output:\n{out}")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def _threads(
    url: str, body: bytes, *, connections: int, duration_s: float, headers: dict[str, str]
) -> Load:
    parts = urlsplit(url)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    stop_at = time.perf_counter() + duration_s
    all_headers = {"Content-Type": "application/json", **headers}

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                conn.request("POST", parts.path, body, all_headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            latencies[i].append(time.perf_counter() - started)
            errors[i] += not ok
        conn.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    flat = sorted(x for per in latencies for x in per)
    p99 = flat[min(len(flat) - 1, int(len(flat) * 0.99))]
    return Load("python threads", len(flat), sum(errors), elapsed, statistics.median(flat), p99)


def run_bodies(
    url: str, bodies: list[bytes], *, connections: int, headers: dict[str, str]
) -> float:
    """Seconds to send every body once (each exactly once, shared out among
    ``connections`` keep-alive connections); raises on any failed request."""
    parts = urlsplit(url)
    queue = list(reversed(bodies))
    lock = threading.Lock()
    failures: list[int] = []
    all_headers = {"Content-Type": "application/json", **headers}

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        while True:
            with lock:
                if not queue:
                    break
                body = queue.pop()
            conn.request("POST", parts.path, body, all_headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
        conn.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: statuses {sorted(set(failures))}")
    return time.perf_counter() - started
