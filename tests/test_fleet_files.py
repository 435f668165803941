"""The fleet's files (issue 16): docker-compose.yml validates against the Compose Specification's JSON schema and
shares no volume between services; every long-running service has a health check and a restart policy; Prometheus
scrapes compose services only; every query of the Grafana dashboard names a metric the project (or Flower) exports.

Compose itself cannot run here (no images to pull), so the file is checked as compose would read it
(``tests.helpers.compose``: parsed, then interpolated)."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.helpers import SECRET_ENV, compose

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "deeptarget.json"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
ONE_SHOT = {"bucket"}  # creates the bucket and exits
# Flower's own metrics (flower/events.py, PrometheusMetrics, Flower 2.0)
FLOWER_METRICS = {"flower_events_total", "flower_task_runtime_seconds", "flower_task_prefetch_time_seconds",
                  "flower_worker_prefetched_tasks", "flower_worker_online",
                  "flower_worker_number_of_currently_executing_tasks"}  # fmt: skip
METRIC = re.compile(r"\b(?:deeptarget|flower)_[a-z0-9_]+\b")


def exported_metrics() -> set[str]:
    """The metric names deeptarget's code declares (first argument of a prometheus_client Counter, Gauge, Histogram
    or Summary, under any alias), as Prometheus sees them: a Counter gets ``_total``, a Histogram its series."""
    names: set[str] = set()
    for path in (ROOT / "deeptarget").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            kind = next((k for k in ("Counter", "Gauge", "Histogram", "Summary") if func.endswith(k)), None)
            name = node.args[0].value
            if kind is None or not isinstance(name, str) or not name.startswith("deeptarget_"):
                continue
            if kind == "Counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif kind in ("Histogram", "Summary"):
                names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    return names


def test_the_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft-07/schema"
    validator = jsonschema.Draft7Validator(schema)  # as the schema declares; no format checker: formats not checked
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(
        compose(SECRET_ENV))]  # fmt: skip
    assert not errors, "\n".join(errors)
    # the schema has teeth: a misspelt key and an unknown depends_on condition are refused
    config = compose(SECRET_ENV)
    config["services"]["api"]["healthcheck"]["intervall"] = "5s"
    config["services"]["worker"]["depends_on"]["bucket"]["condition"] = "service_done"
    assert len(list(validator.iter_errors(config))) == 2


def test_no_secret_is_on_a_command_line() -> None:
    """A container's command line is in ``ps`` for every user of the host; its environment is not."""
    for name, service in compose(SECRET_ENV)["services"].items():
        line = " ".join(str(word) for key in ("command", "entrypoint") for word in service.get(key) or [])
        for secret, value in SECRET_ENV.items():
            assert value not in line, f"{name} has {secret} on its command line"


def test_no_volume_is_shared_between_services_and_the_bucket_is_everyones() -> None:
    services = compose(SECRET_ENV)["services"]
    mounts: Counter[str] = Counter()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):  # a named volume (files of the repository may be read by many)
                mounts[source] += 1
    shared = {name: n for name, n in mounts.items() if n > 1}
    assert not shared, f"volumes mounted by more than one service: {shared}"
    ours = {name: s for name, s in services.items() if s.get("image") == "deeptarget:latest"}
    assert {"worker", "index-writer", "api", "scraper", "beat"} <= set(ours)
    for name, service in ours.items():
        env = service["environment"]
        assert env["DEEPTARGET_OBJECT_STORE_URL"].startswith("s3://"), name
        assert env["DEEPTARGET_OBJECT_STORE_ENDPOINT"] == "http://minio:9000", name
        assert env["AWS_SECRET_ACCESS_KEY"] == SECRET_ENV["MINIO_ROOT_PASSWORD"], name
        assert service["depends_on"]["bucket"] == {"condition": "service_completed_successfully"}, name
    assert "mc mb --ignore-existing" in " ".join(services["bucket"]["entrypoint"])


def test_every_long_running_service_checks_its_health_and_restarts() -> None:
    services = compose(SECRET_ENV)["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", f"{name} is not restarted"


def test_prometheus_scrapes_compose_services_on_the_ports_they_serve() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    services = compose(SECRET_ENV)["services"]
    targets: dict[str, str] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                targets[host] = str(sd["port"])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.partition(":")
                targets[host] = port
    assert set(targets) <= set(services), f"targets that are no compose service: {set(targets) - set(services)}"
    assert {"api", "worker", "index-writer", "scraper", "flower"} <= set(targets)
    for name in ("worker", "index-writer", "scraper"):
        env = services[name]["environment"]
        port = env.get("DEEPTARGET_WORKER_METRICS_PORT") or env.get("DEEPTARGET_SCRAPER_METRICS_PORT")
        assert port == targets[name], f"{name} serves metrics on {port}, Prometheus asks {targets[name]}"
    assert targets["api"] == "8800"


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_dashboard_query_names_a_metric_that_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in (
        "Posts in and out per stage",
        "Queue lag",
        "Rejections by reason",
        "Task failures and retries",
        "Index size",
        "Index version age",
        "API latency (p50, p99)",
        "Bucket requests and errors",
    ):
        assert wanted in titles, wanted  # fmt: skip
    known = exported_metrics() | FLOWER_METRICS | {f"{m}_bucket" for m in FLOWER_METRICS}
    assert {"deeptarget_object_store_requests_total", "deeptarget_index_age_seconds"} <= known
    for title, expr in _expressions(dashboard):
        named = set(METRIC.findall(expr))
        assert named, f"{title}: {expr} names no metric"
        assert named <= known, f"{title}: {sorted(named - known)} are not exported"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/deeptarget.yml").read_text())
    mounted = [v for v in compose(SECRET_ENV)["services"]["grafana"]["volumes"] if "dashboards:" in v]
    assert provider["providers"][0]["options"]["path"] == mounted[0].split(":")[1]
