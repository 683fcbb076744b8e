"""Deploy files: what can be checked without Docker.

docker-compose.yml and the Dockerfile are parsed and held to what the stack
needs (services, mounts, stages, user, health check, entry point) and kept
consistent with nginx.conf and the app's settings; deploy/boot.sh really runs
here (migrations, gunicorn, SIGTERM); the Prometheus alert rules and the
Grafana dashboard are parsed and may only use metrics that app/metrics.py
defines (``promtool check rules`` runs too when promtool is installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.metrics import MetricWrapperBase

from app import metrics
from tests.conftest import API_KEY, migrate_to_head
from tests.servers import ROOT, VENV_BIN, Gunicorn, ServerProcess, free_port, post_send

COMPOSE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"
DOCKERFILE = ROOT / "Dockerfile"
BOOT = ROOT / "deploy" / "boot.sh"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
ALERTS = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SERVICES = ("db", "pgbouncer", "ai-chat-1", "ai-chat-2", "nginx")
INSTANCES = ("ai-chat-1", "ai-chat-2")
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}


# --- the metric catalogue of app/metrics.py ------------------------------------------


def metric_catalogue() -> dict[str, set[str]]:
    """Every series name the app can expose → the label names it may carry."""
    series: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        [family] = collector.describe()
        # A private attribute, but of our own metrics; describe() has no labels.
        labels = set(collector._labelnames) | TARGET_LABELS
        if family.type == "counter":
            series[f"{family.name}_total"] = labels
        elif family.type == "histogram":
            series[f"{family.name}_bucket"] = labels | {"le"}
            series[f"{family.name}_count"] = labels
            series[f"{family.name}_sum"] = labels
        else:
            series[family.name] = labels
    series["up"] = set(TARGET_LABELS)
    return series


CATALOGUE = metric_catalogue()
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(?=[\[{)\s]|$)")
LABEL_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
BY_CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
PROMQL_WORDS = {
    "sum", "rate", "increase", "histogram_quantile", "by", "without", "and", "or", "unless",
    "avg", "max", "min", "count", "irate", "on", "ignoring", "bool", "offset",
}


def promql_problems(expr: str) -> list[str]:
    """Unknown metric names and label names in one PromQL expression."""
    problems = []
    used_labels: set[str] = set()
    names = []
    # Label values, range durations and grouping clauses are not metric names.
    bare = BY_CLAUSE.sub("", re.sub(r"\"[^\"]*\"|\[[^\]]*\]", "", expr))
    for name, braces in SELECTOR.findall(bare):
        if name in PROMQL_WORDS or name.startswith("$") or re.fullmatch(r"[\d.]+", name):
            continue
        names.append(name)
        if name not in CATALOGUE:
            problems.append(f"unknown metric {name}")
            continue
        for label in LABEL_MATCHER.findall(braces or ""):
            used_labels.add(label)
            if label not in CATALOGUE[name]:
                problems.append(f"{name} has no label {label}")
    known_here = set().union(*(CATALOGUE.get(name, set()) for name in names)) if names else set()
    for clause in BY_CLAUSE.findall(expr):
        for label in (part.strip() for part in clause.split(",") if part.strip()):
            if label not in known_here:
                problems.append(f"grouping by unknown label {label}")
    return problems


def test_promql_checker_catches_unknown_metrics_and_labels():
    assert promql_problems('sum(rate(ai_chat_llm_requests_total{outcome="ok"}[5m]))') == []
    assert promql_problems("rate(ai_chat_no_such_metric_total[5m])") == [
        "unknown metric ai_chat_no_such_metric_total"
    ]
    assert promql_problems('rate(ai_chat_llm_requests_total{status="500"}[5m])') == [
        "ai_chat_llm_requests_total has no label status"
    ]
    assert promql_problems("sum by (phase) (rate(ai_chat_llm_tokens_total[5m]))") == [
        "grouping by unknown label phase"
    ]


# --- docker-compose.yml ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_database_two_instances_and_nginx(compose):
    assert set(SERVICES) <= set(compose["services"])


def test_compose_nginx_mounts_the_repository_nginx_conf(compose):
    nginx = compose["services"]["nginx"]
    mounts = [volume.split(":") for volume in nginx["volumes"]]
    sources = {Path(source).as_posix(): target for source, target, *_ in mounts}
    assert sources.get("deploy/nginx.conf", sources.get("./deploy/nginx.conf")) == (
        "/etc/nginx/nginx.conf"
    )
    assert NGINX_CONF.is_file()
    assert set(INSTANCES) <= set(nginx["depends_on"])
    assert nginx["ports"], "nginx publishes no port"


@pytest.mark.parametrize("name", INSTANCES)
def test_compose_instances_go_through_pgbouncer_and_migrate_on_postgres(compose, name):
    service = compose["services"][name]
    environment = service["environment"]
    assert service["build"] == "."
    assert "@pgbouncer:6432/" in environment["DATABASE_URL"]
    # The migration lock is a session lock: migrations bypass the transaction pooler.
    assert "@db:5432/" in environment["MIGRATIONS_DATABASE_URL"]
    assert environment["API_SECRET_KEY"].startswith("${API_SECRET_KEY:?")
    assert "pgbouncer" in service["depends_on"]


def test_compose_pgbouncer_pools_transactions_in_front_of_postgres(compose):
    pgbouncer = compose["services"]["pgbouncer"]
    environment = pgbouncer["environment"]
    assert environment["POOL_MODE"] == "transaction"
    assert "@db:5432/" in environment["DATABASE_URL"]
    assert pgbouncer["depends_on"]["db"]["condition"] == "service_healthy"


def test_compose_passes_every_setting_of_the_readme(compose):
    table = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", table, re.M))
    passed = set(compose["services"][INSTANCES[0]]["environment"])
    # Set by the image or the compose file itself, or documented as a pattern.
    missing = documented - passed - {"PROMETHEUS_MULTIPROC_DIR", "GUNICORN_BIND",
                                     "GUNICORN_HOST", "AI_CHAT_ENV_FILE"}
    assert sorted(missing) == []


@pytest.mark.parametrize("name", INSTANCES)
def test_compose_passes_only_settings_the_service_reads(compose, name):
    readers = (ROOT / "app" / "config.py").read_text() + (ROOT / "gunicorn.conf.py").read_text()
    unknown = [
        variable
        for variable in compose["services"][name]["environment"]
        if f'"{variable}"' not in readers and f"'{variable}'" not in readers
    ]
    assert unknown == []


def test_compose_upstreams_in_nginx_conf_are_the_compose_instances(compose):
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", NGINX_CONF.read_text(), re.M)
    ports = {compose["services"][name]["environment"]["AI_CHAT_PORT"] for name in INSTANCES}
    assert sorted(host for host, _ in upstreams) == sorted(INSTANCES)
    assert {port for _, port in upstreams} == ports


@pytest.mark.parametrize("name", INSTANCES)
def test_compose_grace_period_outlasts_gunicorn_graceful_timeout(compose, name):
    # gunicorn.conf.py: graceful_timeout = REQUEST_DEADLINE (default 55) + 5.
    grace = compose["services"][name]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace)
    assert int(grace[:-1]) > 55 + 5


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose is not installed here",
)
def test_docker_compose_accepts_the_file():
    completed = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        env={**os.environ, "API_SECRET_KEY": "x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_dockerfile_is_a_multi_stage_build():
    instructions = dockerfile_instructions()
    stages = [args.split() for name, args in instructions if name == "FROM"]
    named = {words[2] for words in stages if len(words) >= 3 and words[1].upper() == "AS"}
    copied_from = {
        re.search(r"--from=(\S+)", args).group(1)
        for name, args in instructions
        if name == "COPY" and "--from=" in args
    }
    assert len(stages) >= 2
    assert copied_from and copied_from <= named


def test_dockerfile_runs_as_a_non_root_user():
    instructions = [name for name, _ in dockerfile_instructions()]
    users = [args.strip() for name, args in dockerfile_instructions() if name == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert instructions.index("USER") < instructions.index("CMD")


def healthcheck_command() -> str:
    [check] = [args for name, args in dockerfile_instructions() if name == "HEALTHCHECK"]
    return check.split(" CMD ", 1)[1]


def test_dockerfile_healthcheck_answers_while_every_thread_waits_on_the_model(
    tmp_path, fake_llm
):
    """With both threads of the only worker held by slow answers, an HTTP probe of
    /health would wait in the queue; the image's check must still pass at once."""
    fake_llm.latency = 4
    env = {"API_SECRET_KEY": API_KEY, "DATABASE_URL": f"sqlite:///{tmp_path}/hc.db",
           "OPENAI_BASE_URL": fake_llm.url, "LLM_DEADLINE": "10"}
    migrate_to_head(env["DATABASE_URL"])
    with Gunicorn(env, workers=1, threads=2) as server, ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(post_send, server.url, n) for n in (1, 2)]
        assert fake_llm.wait_for(lambda: fake_llm.calls == 2)
        with pytest.raises(requests.Timeout):
            requests.get(f"{server.url}/health", timeout=1)
        started = time.monotonic()
        check = subprocess.run(
            ["sh", "-c", healthcheck_command().removesuffix(" || exit 1")],
            env={**os.environ, "AI_CHAT_PORT": str(server.port)},
            capture_output=True, text=True, timeout=10,
        )
        assert check.returncode == 0, check.stderr
        assert time.monotonic() - started < 2
        assert [future.result()[0] for future in busy] == [200, 200]


def test_dockerfile_healthcheck_fails_when_nothing_listens():
    check = subprocess.run(
        ["sh", "-c", healthcheck_command().removesuffix(" || exit 1")],
        env={**os.environ, "AI_CHAT_PORT": str(free_port())},
        capture_output=True, text=True, timeout=10,
    )
    assert check.returncode != 0


def test_dockerfile_starts_deploy_boot_sh():
    [cmd] = [args for name, args in dockerfile_instructions() if name == "CMD"]
    assert json.loads(cmd) == ["sh", "./deploy/boot.sh"]


def test_dockerfile_needs_no_buildkit_only_syntax():
    text = DOCKERFILE.read_text()
    assert "--chmod" not in text and "--mount" not in text and "# syntax=" not in text


def test_dockerfile_copies_only_files_that_exist():
    missing = []
    for name, args in dockerfile_instructions():
        if name != "COPY" or "--from=" in args:
            continue
        sources = [word for word in args.split() if not word.startswith("--")][:-1]
        missing += [source for source in sources if not (ROOT / source).exists()]
    assert missing == []


def test_dockerignore_keeps_secrets_and_local_state_out_but_not_the_code():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv/", "tests/"} <= ignored
    assert not ignored & {"app/", "migrations/", "deploy/", "wsgi.py", "gunicorn.conf.py"}


# --- deploy/boot.sh -----------------------------------------------------------------------


def boot_env(tmp_path: Path, **overrides) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("API_SECRET_KEY", "DATABASE_URL", "AI_CHAT_DATABASE_URL")
        and not key.startswith(("PROMETHEUS_", "AI_CHAT_METRICS_", "GUNICORN_"))
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        API_SECRET_KEY="boot-test-key",
        DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS="2",
        LLM_DEADLINE="5",
        LOG_LEVEL="WARNING",
    )
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def migration_heads() -> set[str]:
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory(str(ROOT / "migrations")).get_heads())


@pytest.fixture
def booted(tmp_path):
    """deploy/boot.sh started from another directory, up and answering /health."""
    port = free_port()
    server = ServerProcess(
        [str(BOOT)],
        port=port,
        log_path=tmp_path / "boot.log",
        cwd=tmp_path,
        env=boot_env(tmp_path, GUNICORN_BIND=f"127.0.0.1:{port}"),
        name="deploy/boot.sh",
    )
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


def test_boot_sh_is_an_executable_posix_script():
    assert os.access(BOOT, os.X_OK)
    assert BOOT.read_text().startswith("#!/bin/sh")


def test_boot_sh_runs_the_migrations_before_serving(booted, tmp_path):
    response = requests.get(f"{booted.url}/health", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    connection = sqlite3.connect(tmp_path / "x.db")
    try:
        versions = {
            row[0] for row in connection.execute("SELECT version_num FROM ai_chat_alembic_version")
        }
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    finally:
        connection.close()
    assert versions == migration_heads()
    assert {"ai_chat_requests", "ai_chat_daily_limits", "ai_chat_idempotency_keys"} <= tables
    # The main server's Alembic table is never created (nor read) by this service.
    assert "alembic_version" not in tables


def test_boot_sh_says_once_that_the_llm_is_not_configured(booted):
    # boot_env sets no LLM: the migrations step stays quiet, the server says it.
    assert booted.log().count("LLM not configured") == 1, booted.log()


def test_boot_sh_becomes_gunicorn_and_stops_cleanly_on_sigterm(booted):
    process = booted.process
    command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"gunicorn") for part in command_line), command_line

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=30) == 0


@pytest.mark.parametrize("how", ["unset", "empty"])
def test_boot_sh_without_api_secret_key_exits_with_one_line(tmp_path, how):
    env = boot_env(tmp_path, API_SECRET_KEY=None if how == "unset" else "")

    completed = subprocess.run(
        [str(BOOT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    assert completed.returncode != 0
    lines = [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "API_SECRET_KEY" in lines[0]
    assert not (tmp_path / "x.db").exists()


# --- deploy/alerts.yml ------------------------------------------------------------------


@pytest.fixture(scope="module")
def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict) and document.get("groups"), "no rule groups"
    rules = []
    for group in document["groups"]:
        assert group.get("name") and group.get("rules"), group
        rules += group["rules"]
    return rules


def test_alert_rules_have_the_prometheus_rule_shape(alert_rules):
    problems = []
    for rule in alert_rules:
        name = rule.get("alert", "<no name>")
        if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", name):
            problems.append(f"{name}: alert name not CamelCase")
        if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
            problems.append(f"{name}: no expr")
        if not re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))):
            problems.append(f"{name}: for is not a duration")
        if (rule.get("labels") or {}).get("severity") not in ("warning", "critical"):
            problems.append(f"{name}: severity not warning/critical")
        if not (rule.get("annotations") or {}).get("summary"):
            problems.append(f"{name}: no annotations.summary")
        if set(rule) - {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}:
            problems.append(f"{name}: unknown keys {set(rule)}")
    names = [rule.get("alert") for rule in alert_rules]
    assert problems == []
    assert len(names) == len(set(names)), "duplicate alert names"


def test_alert_rules_use_only_metrics_the_app_defines(alert_rules):
    problems = {rule["alert"]: promql_problems(rule["expr"]) for rule in alert_rules}
    assert {name: found for name, found in problems.items() if found} == {}


def threshold(expr: str) -> float:
    match = re.search(r">\s*([0-9.]+)\s*$", expr.strip())
    assert match, f"no trailing threshold in {expr!r}"
    return float(match.group(1))


@pytest.mark.parametrize(
    ("series", "limit", "severity"),
    [
        ("ai_chat_http_request_duration_seconds_bucket", 3, "warning"),
        ("ai_chat_http_request_duration_seconds_bucket", 10, "critical"),
        ("ai_chat_llm_request_duration_seconds_bucket", 2, "warning"),
        ("ai_chat_llm_request_duration_seconds_bucket", 8, "critical"),
        ('ai_chat_send_phase_duration_seconds_bucket{phase="quota"}', 0.05, "warning"),
        ('ai_chat_send_phase_duration_seconds_bucket{phase="save"}', 0.1, "warning"),
    ],
)
def test_latency_targets_have_p99_alerts(alert_rules, series, limit, severity):
    matching = [
        rule
        for rule in alert_rules
        if series in rule["expr"] and "histogram_quantile(0.99" in rule["expr"]
        and threshold(rule["expr"]) == limit and rule["labels"]["severity"] == severity
    ]
    assert len(matching) == 1, [rule["alert"] for rule in alert_rules]


def test_latency_thresholds_sit_on_histogram_buckets(alert_rules):
    quantile_rules = [rule for rule in alert_rules if "histogram_quantile" in rule["expr"]]
    assert quantile_rules
    assert [
        rule["alert"] for rule in quantile_rules if threshold(rule["expr"]) not in metrics.BUCKETS
    ] == []


def test_llm_error_ratio_alert_divides_failures_by_all_calls(alert_rules):
    [*ratios] = [
        rule for rule in alert_rules
        if 'ai_chat_llm_requests_total{outcome!="ok"}' in rule["expr"] and "/" in rule["expr"]
    ]
    assert {rule["labels"]["severity"] for rule in ratios} >= {"warning"}
    assert all(0 < threshold(rule["expr"]) < 1 for rule in ratios)


def test_instance_down_alert_watches_up(alert_rules):
    [down] = [rule for rule in alert_rules if re.match(r"up\{[^}]*\}\s*==\s*0$", rule["expr"])]
    assert down["labels"]["severity"] == "critical"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_alert_rules():
    completed = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


# --- deploy/grafana-dashboard.json ----------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return panels


def test_dashboard_is_a_grafana_dashboard(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert graph_panels(dashboard)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_panels_query_the_prometheus_datasource_variable(dashboard):
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in graph_panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"


def test_dashboard_queries_use_only_metrics_the_app_defines(dashboard):
    problems = {
        f"{panel['title']} / {target['refId']}": promql_problems(target["expr"])
        for panel in graph_panels(dashboard)
        for target in panel["targets"]
    }
    assert {where: found for where, found in problems.items() if found} == {}


def test_dashboard_shows_every_metric_the_app_defines(dashboard):
    queries = " ".join(
        target["expr"] for panel in graph_panels(dashboard) for target in panel["targets"]
    )
    families = {
        collector.describe()[0].name
        for collector in vars(metrics).values()
        if isinstance(collector, MetricWrapperBase)
    }
    assert sorted(name for name in families if name not in queries) == []


def test_dashboard_panels_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    overlaps = []
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                if (x, y) in cells:
                    overlaps.append((cells[(x, y)], panel["title"]))
                cells[(x, y)] = panel["title"]
    assert sorted(set(overlaps)) == []
