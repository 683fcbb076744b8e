"""Deploy files: what can be checked without Docker.

docker-compose.yml and the Dockerfile are parsed and held to what the stack
needs (services, mounts, stages, user, health checks, restarts, autoheal, entry
point) and kept consistent with nginx.conf and the app's settings; deploy/boot.sh
really runs here (migrations, gunicorn, SIGTERM); the Prometheus alert rules and
the Grafana dashboard are parsed and may only use metrics that app/metrics.py
defines (or that the app is adding: PENDING_APP_SERIES); the alerting path
(prometheus.yml, alertmanager.yml and its entry point) is held to the one-minute
promise and to keeping secrets out of files. ``promtool check rules/config`` and
``promtool test rules``, ``amtool check-config`` and ``amtool config routes test``
run too when promtool and amtool are installed (.ci/run installs them).
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
ALERTS_TEST = ROOT / "deploy" / "alerts.test.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
BLACKBOX = ROOT / "deploy" / "blackbox.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager.yml"
ALERTMANAGER_ENTRYPOINT = ROOT / "deploy" / "alertmanager-entrypoint.sh"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SERVICES = ("db", "pgbouncer", "redis", "ai-chat-1", "ai-chat-2", "nginx")
MONITORING = ("prometheus", "blackbox", "alertmanager", "autoheal")
INSTANCES = ("ai-chat-1", "ai-chat-2")
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}
# The promise of the alerting path: a Telegram message within a minute of the
# service going down.
ALERT_WITHIN_SECONDS = 60
# What the Alertmanager container reads from the environment (README.md, section Alerts).
ALERT_SETTINGS = {
    "ALERT_TELEGRAM_BOT_TOKEN", "ALERT_TELEGRAM_CHAT_ID", "ALERT_EMAIL_TO",
    "ALERT_SMTP_HOST", "ALERT_SMTP_FROM", "ALERT_SMTP_USER", "ALERT_SMTP_PASSWORD",
}


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

# v1.2 metrics the alert rules already use while the application engineers add
# them to app/metrics.py (name -> its labels beside job/instance). This list only
# shrinks: delete a name once app/metrics.py defines it (the app's own labels then
# win, so a rule that groups by a label the app does not have still fails).
PENDING_APP_SERIES: dict[str, set[str]] = {}
# Series of the monitoring stack itself that the rules read (not the app's).
STACK_SERIES: dict[str, set[str]] = {
    "probe_success": set(),
    "alertmanager_notifications_failed_total": {"integration"},
}
RULE_CATALOGUE = {
    **{name: labels | TARGET_LABELS for name, labels in PENDING_APP_SERIES.items()},
    **{name: labels | TARGET_LABELS for name, labels in STACK_SERIES.items()},
    **CATALOGUE,
}

SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(?=[\[{)\s]|$)")
LABEL_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
BY_CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
PROMQL_WORDS = {
    "sum", "rate", "increase", "histogram_quantile", "by", "without", "and", "or", "unless",
    "avg", "max", "min", "count", "irate", "on", "ignoring", "bool", "offset",
    "group_left", "group_right",
}
# Matching clauses name labels, not metrics; offsets are durations.
MATCHING_CLAUSE = re.compile(r"\b(?:on|ignoring|group_left|group_right)\s*\([^)]*\)")
OFFSET = re.compile(r"\boffset\s+[0-9smhdwy]+")


def promql_problems(expr: str, catalogue: dict[str, set[str]] = CATALOGUE) -> list[str]:
    """Unknown metric names and label names in one PromQL expression."""
    problems = []
    used_labels: set[str] = set()
    names = []
    # Label values, range durations, offsets and grouping or matching clauses are
    # not metric names.
    bare = re.sub(r"\"[^\"]*\"|\[[^\]]*\]", "", expr)
    bare = OFFSET.sub("", MATCHING_CLAUSE.sub("", BY_CLAUSE.sub("", bare)))
    for name, braces in SELECTOR.findall(bare):
        if name in PROMQL_WORDS or name.startswith("$") or re.fullmatch(r"[\d.]+", name):
            continue
        names.append(name)
        if name not in catalogue:
            problems.append(f"unknown metric {name}")
            continue
        for label in LABEL_MATCHER.findall(braces or ""):
            used_labels.add(label)
            if label not in catalogue[name]:
                problems.append(f"{name} has no label {label}")
    known_here = set().union(*(catalogue.get(name, set()) for name in names)) if names else set()
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


def test_promql_checker_reads_offsets_and_matching_clauses():
    expr = (
        "sum(ai_chat_llm_breaker_opened_total unless ai_chat_llm_breaker_opened_total offset 5m)"
        " > on() group_left() max(ai_chat_quota_reservations_total)"
    )
    assert promql_problems(expr) == []
    assert promql_problems("sum(ai_chat_made_up_total)") == [
        "unknown metric ai_chat_made_up_total"
    ]
    assert promql_problems("sum(up)", RULE_CATALOGUE) == []


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


# The v1.2 settings of the contract ("Configuration"). The compose file passes them
# all through; app/config.py learns to read them as the v1.2 features land.
V1_2_SETTINGS = {
    "MAIN_SERVER_URL", "MAIN_SERVER_API_KEY", "TOOLS_ENABLED", "TOOLS_MAX_ROUNDS",
    "TOOL_TIMEOUT", "TOOL_RESULT_MAX_CHARS", "TOOL_CACHE_SECONDS", "LLM_MODELS_WITHOUT_TOOLS",
    "REDIS_URL", "REDIS_TIMEOUT", "ANSWER_CACHE", "ANSWER_CACHE_TTL", "SUMMARY_ENABLED",
    "SUMMARY_MODEL", "SUMMARY_MAX_CHARS", "SUMMARY_EVERY", "LLM_PRICES", "PRICE_CURRENCY",
    "DAILY_SPEND_LIMIT", "ALERT_SPEND_PER_HOUR",
}


@pytest.mark.parametrize("name", INSTANCES)
def test_compose_passes_only_settings_the_service_reads(compose, name):
    readers = (ROOT / "app" / "config.py").read_text() + (ROOT / "gunicorn.conf.py").read_text()
    unknown = [
        variable
        for variable in compose["services"][name]["environment"]
        if f'"{variable}"' not in readers and f"'{variable}'" not in readers
        and variable not in V1_2_SETTINGS
    ]
    assert unknown == []


@pytest.mark.parametrize("name", INSTANCES)
def test_compose_passes_the_v1_2_settings_and_the_stack_redis(compose, name):
    environment = compose["services"][name]["environment"]
    assert sorted(V1_2_SETTINGS - set(environment)) == []
    # Pass-through keys (no value) except the stack's own Redis.
    assert {key for key in V1_2_SETTINGS if environment[key] is not None} == {"REDIS_URL"}
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert compose["services"][name]["depends_on"]["redis"]["condition"] == "service_started"


def test_compose_every_service_restarts_and_pins_its_image(compose):
    problems = []
    for name, service in compose["services"].items():
        if service.get("restart") not in ("always", "unless-stopped", "on-failure"):
            problems.append(f"{name}: restart {service.get('restart')!r}")
        if "build" in service:
            continue
        image = service.get("image", "")
        tag = image.rpartition(":")[2] if ":" in image else ""
        if not re.search(r"\d", tag) or tag == "latest":
            problems.append(f"{name}: image {image!r} is not pinned to a version")
    assert problems == []


@pytest.mark.parametrize("name", (*INSTANCES, "redis", "prometheus", "alertmanager", "blackbox"))
def test_compose_service_has_a_health_check(compose, name):
    healthcheck = compose["services"][name]["healthcheck"]
    assert healthcheck["test"] and healthcheck["interval"] and healthcheck["retries"] >= 1


@pytest.mark.parametrize("name", INSTANCES)
def test_compose_instance_health_check_stays_a_tcp_connect(compose, name):
    # autoheal restarts on it: an HTTP probe would queue behind the answers of a
    # saturated (healthy) instance and get it killed (Dockerfile, HEALTHCHECK).
    [test] = compose["services"][name]["healthcheck"]["test"][1:]
    assert "socket.create_connection" in test and "/health" not in test


def test_compose_redis_keeps_no_persistence_and_answers_ping(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[:5] == ["redis-server", "--save", "", "--appendonly", "no"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]
    assert "volumes" not in redis and "ports" not in redis


def test_compose_autoheal_restarts_the_labelled_unhealthy_instances(compose):
    services = compose["services"]
    autoheal = services["autoheal"]
    assert autoheal["image"].startswith("willfarrell/autoheal:")
    assert "/var/run/docker.sock:/var/run/docker.sock" in autoheal["volumes"]
    label = autoheal["environment"]["AUTOHEAL_CONTAINER_LABEL"]
    watched = {name for name, service in services.items()
               if (service.get("labels") or {}).get(label) == "true"}
    assert watched == {*INSTANCES, "redis"}
    for name in INSTANCES:
        labels = services[name]["labels"]
        grace = int(services[name]["stop_grace_period"].removesuffix("s"))
        # Answers in flight finish on an autoheal restart as on `docker compose down`,
        # and the restart call to Docker outlasts that wait.
        assert int(labels["autoheal.stop.timeout"]) >= grace
        assert int(autoheal["environment"]["CURL_TIMEOUT"]) > int(labels["autoheal.stop.timeout"])
        # Migrations run before gunicorn listens: autoheal must not count them.
        start = services[name]["healthcheck"]["start_period"]
        assert re.fullmatch(r"\d+m", start) and int(start[:-1]) >= 5


def test_compose_monitoring_mounts_the_repository_configs_read_only(compose):
    services = compose["services"]
    assert set(MONITORING) <= set(services)

    def mounts(name):
        """Repository files mounted into the service: source -> target."""
        return {source: target for source, target, *_ in
                (volume.split(":") for volume in services[name]["volumes"])
                if source.startswith("./")}

    assert mounts("prometheus") == {
        "./deploy/prometheus.yml": "/etc/prometheus/prometheus.yml",
        "./deploy/alerts.yml": "/etc/prometheus/alerts.yml",
    }
    assert mounts("blackbox") == {"./deploy/blackbox.yml": "/etc/blackbox_exporter/config.yml"}
    assert mounts("alertmanager") == {
        "./deploy/alertmanager.yml": "/etc/alertmanager/alertmanager.tmpl.yml",
        "./deploy/alertmanager-entrypoint.sh": "/etc/alertmanager/entrypoint.sh",
    }
    writable = [volume for name in ("prometheus", "blackbox", "alertmanager")
                for volume in services[name]["volumes"]
                if volume.startswith("./") and not volume.endswith(":ro")]
    assert writable == []
    # Prometheus and Alertmanager have no authentication: loopback only.
    for name in ("prometheus", "alertmanager"):
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])


def test_compose_alertmanager_takes_its_secrets_from_the_environment(compose):
    alertmanager = compose["services"]["alertmanager"]
    assert alertmanager["entrypoint"] == ["/bin/sh", "/etc/alertmanager/entrypoint.sh"]
    environment = alertmanager["environment"]
    # Pass-through keys only: a value here would be a secret in the repository.
    assert set(environment) == ALERT_SETTINGS
    assert {key: value for key, value in environment.items() if value is not None} == {}
    # The rendered copy (with the token) lives on a tmpfs.
    assert "/tmp" in alertmanager["tmpfs"]


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
        for annotation in ("summary", "description"):
            if not (rule.get("annotations") or {}).get(annotation):
                problems.append(f"{name}: no annotations.{annotation}")
        if set(rule) - {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}:
            problems.append(f"{name}: unknown keys {set(rule)}")
    names = [rule.get("alert") for rule in alert_rules]
    assert problems == []
    assert len(names) == len(set(names)), "duplicate alert names"


def test_alert_rules_use_only_metrics_the_app_defines_or_is_adding(alert_rules):
    problems = {rule["alert"]: promql_problems(rule["expr"], RULE_CATALOGUE)
                for rule in alert_rules}
    assert {name: found for name, found in problems.items() if found} == {}


def test_alert_rules_use_every_pending_and_stack_series(alert_rules):
    # A name nobody reads any more is dropped from PENDING_APP_SERIES/STACK_SERIES.
    exprs = " ".join(rule["expr"] for rule in alert_rules)
    assert [name for name in (*PENDING_APP_SERIES, *STACK_SERIES) if name not in exprs] == []


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
        if 'ai_chat_llm_requests_total{outcome!~"ok|cancelled"}' in rule["expr"]
        and "/" in rule["expr"]
    ]
    assert {rule["labels"]["severity"] for rule in ratios} >= {"warning"}
    assert all(0 < threshold(rule["expr"]) < 1 for rule in ratios)


def rule(alert_rules: list[dict], name: str) -> dict:
    [found] = [rule for rule in alert_rules if rule["alert"] == name]
    return found


def seconds(duration: str) -> int:
    """A Prometheus/Alertmanager duration of one unit ("20s", "1m") in seconds."""
    match = re.fullmatch(r"(\d+)([smh])", str(duration))
    assert match, duration
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def test_instance_down_alert_watches_up(alert_rules):
    [down] = [rule for rule in alert_rules
              if re.match(r'up\{job="ai-chat"\}\s*==\s*0$', rule["expr"])]
    assert down["labels"]["severity"] == "critical"


@pytest.mark.parametrize(
    ("name", "selector"),
    [("AiChatServiceDown", 'probe_success{job="ai-chat-edge"} == 0'),
     ("AiChatInstanceNotReady", 'probe_success{job="ai-chat-ready"} == 0')],
)
def test_probe_alerts_watch_the_blackbox_jobs(alert_rules, name, selector):
    found = rule(alert_rules, name)
    assert found["expr"] == selector and found["labels"]["severity"] == "critical"


@pytest.mark.parametrize(
    ("name", "reads"),
    [
        ("AiChatHttpErrorRatioHigh", 'status=~"5.."'),
        ("AiChatLlmBreakerOpened", "ai_chat_llm_breaker_opened_total"),
        ("AiChatMainServerBreakerOpened", "ai_chat_mainserver_breaker_opened_total"),
        ("AiChatDatabaseErrors", "ai_chat_database_errors_total"),
        ("AiChatRedisDown", "ai_chat_redis_up"),
        ("AiChatRedisFallbacksHigh", 'outcome="fallback"'),
        ("AiChatToolFailureRatioHigh", 'outcome=~"unavailable|timeout|breaker_open"'),
        ("AiChatSpendPerHourHigh", "max(ai_chat_alert_spend_per_hour)"),
        ("AiChatAlertDeliveryFailing", "alertmanager_notifications_failed_total"),
    ],
)
def test_the_contract_alerts_exist(alert_rules, name, reads):
    assert reads in rule(alert_rules, name)["expr"]


def test_spend_threshold_comes_from_the_setting_gauge_only(alert_rules):
    expr = rule(alert_rules, "AiChatSpendPerHourHigh")["expr"]
    # The threshold lives in ALERT_SPEND_PER_HOUR: no number in the comparison.
    assert re.search(r">\s*on\(\)\s*group_left\(\)\s*max\(ai_chat_alert_spend_per_hour\)$", expr)
    assert "increase(ai_chat_llm_cost_total[1h])" in expr


def test_warning_and_critical_pairs_share_a_symptom(alert_rules):
    by_symptom: dict[str, list[str]] = {}
    for found in alert_rules:
        if "symptom" in found["labels"]:
            by_symptom.setdefault(found["labels"]["symptom"], []).append(
                found["labels"]["severity"])
    assert by_symptom, "no paired alerts"
    assert {symptom: sorted(levels) for symptom, levels in by_symptom.items()} == {
        symptom: ["critical", "warning"] for symptom in by_symptom
    }


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed"
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    completed = promtool("check", "rules", str(ALERTS))
    assert completed.returncode == 0, completed.stdout + completed.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules_pass():
    completed = promtool("test", "rules", str(ALERTS_TEST))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SUCCESS" in completed.stdout


@needs_promtool
def test_promtool_accepts_prometheus_yml_and_finds_the_rules():
    completed = promtool("check", "config", str(PROMETHEUS))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "1 rule files found" in completed.stdout


@pytest.mark.parametrize(
    "alert",
    ["AiChatInstanceDown", "AiChatServiceDown", "AiChatSpendPerHourHigh",
     "AiChatToolFailureRatioHigh", "AiChatToolFailureRatioCritical", "AiChatRedisDown",
     "AiChatRedisFallbacksHigh", "AiChatLlmBreakerOpened"],
)
def test_alert_unit_tests_cover(alert):
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert alert in tested


# --- deploy/prometheus.yml and deploy/blackbox.yml ---------------------------------------


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text())


def scrape_job(prometheus: dict, name: str) -> dict:
    [job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == name]
    return {**prometheus["global"], **job}


def job_targets(job: dict) -> list[str]:
    return [target for config in job["static_configs"] for target in config["targets"]]


def test_prometheus_scrapes_both_instances_every_15_s_or_faster(prometheus, compose):
    job = scrape_job(prometheus, "ai-chat")
    port = compose["services"][INSTANCES[0]]["environment"]["AI_CHAT_PORT"]
    assert sorted(job_targets(job)) == [f"{name}:{port}" for name in INSTANCES]
    assert seconds(job["scrape_interval"]) <= 15
    assert seconds(job["scrape_timeout"]) < seconds(job["scrape_interval"])


@pytest.mark.parametrize(
    ("name", "paths"),
    [("ai-chat-edge", ["http://nginx:80/health"]),
     ("ai-chat-ready", [f"http://{name}:9001/health/ready" for name in INSTANCES])],
)
def test_prometheus_probes_through_the_blackbox_exporter(prometheus, compose, name, paths):
    job = scrape_job(prometheus, name)
    assert job["metrics_path"] == "/probe" and job["params"]["module"] == ["http_2xx"]
    assert sorted(job_targets(job)) == sorted(paths)
    relabels = {relabel["target_label"]: relabel for relabel in job["relabel_configs"]}
    assert relabels["__address__"]["replacement"] == "blackbox:9115"
    # instance = host:port, as the ai-chat job names it (the inhibition matches on it).
    pattern = re.compile(relabels["instance"]["regex"])
    assert [pattern.fullmatch(path).group(1) for path in paths] == [
        path.split("/")[2] for path in paths
    ]
    assert "blackbox" in compose["services"] and "nginx" in compose["services"]


def test_blackbox_module_times_out_before_the_scrape(prometheus):
    module = yaml.safe_load(BLACKBOX.read_text())["modules"]["http_2xx"]
    assert module["prober"] == "http"
    assert seconds(module["timeout"]) < seconds(prometheus["global"]["scrape_timeout"])


def test_prometheus_evaluates_alerts_yml_and_notifies_the_compose_alertmanager(prometheus):
    assert prometheus["rule_files"] == ["alerts.yml"]
    [alertmanagers] = prometheus["alerting"]["alertmanagers"]
    assert job_targets(alertmanagers) == ["alertmanager:9093"]
    assert seconds(prometheus["global"]["evaluation_interval"]) <= 15


@pytest.mark.parametrize("name", ["AiChatServiceDown", "AiChatInstanceDown"])
def test_down_alerts_reach_telegram_within_a_minute(prometheus, alert_rules, name):
    """The worst case, added up from the three files (alerts.yml explains it)."""
    route = alertmanager_config()["route"]
    worst = (
        seconds(prometheus["global"]["scrape_interval"])  # until the next scrape or probe
        + seconds(prometheus["global"]["scrape_timeout"])  # that scrape timing out
        + seconds(prometheus["global"]["evaluation_interval"])  # until a rule sees it
        + seconds(rule(alert_rules, name)["for"])  # pending -> firing
        + seconds(route["group_wait"])  # Alertmanager's first send of the group
    )
    assert worst < ALERT_WITHIN_SECONDS
    # And one failed scrape alone never fires: `for` spans at least two evaluations.
    assert seconds(rule(alert_rules, name)["for"]) >= 2 * seconds(
        prometheus["global"]["evaluation_interval"])


# --- deploy/alertmanager.yml and its entry point -----------------------------------------

PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")
# Telegram bot tokens ("123456789:AA..."), and chat ids written as values.
TOKEN_LITERAL = re.compile(r"\b\d{5,}:[A-Za-z0-9_-]{20,}\b")
CHAT_ID_LITERAL = re.compile(r"chat_id\s*[:=]\s*['\"]?-?\d")
# Dummy values shaped like the real ones; the password holds every character that
# YAML quoting or the renderer could trip on.
DUMMY_ALERT_ENV = {
    "ALERT_TELEGRAM_BOT_TOKEN": "123456789:AAtest-token_value",
    "ALERT_TELEGRAM_CHAT_ID": "-1001234567890",
    "ALERT_EMAIL_TO": "ops@example.com, oncall@example.com",
    "ALERT_SMTP_HOST": "smtp.example.com:587",
    "ALERT_SMTP_FROM": "ai-chat-alerts@example.com",
    "ALERT_SMTP_USER": "ai-chat-alerts",
    "ALERT_SMTP_PASSWORD": "p'a\"s s\\w&o$rd ${X} %s: #",
}


def alertmanager_config() -> dict:
    """The template parsed as YAML (the placeholders are plain strings there)."""
    return yaml.safe_load(ALERTMANAGER.read_text())


def busybox_bin(tmp_path: Path) -> Path | None:
    """A directory whose sh, awk, grep, mv and rm are busybox's (the image's)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        return None
    directory = tmp_path / "busybox-bin"
    directory.mkdir()
    for tool in ("sh", "awk", "grep", "mv", "rm"):
        (directory / tool).symlink_to(busybox)
    return directory


def render_alertmanager(tmp_path: Path, shell: str = "system", **overrides) -> tuple:
    """Run the entry point with --render-only as the container does."""
    env = {"PATH": os.environ.get("PATH", ""), **DUMMY_ALERT_ENV, **overrides}
    env = {key: value for key, value in env.items() if value is not None}
    config = tmp_path / "alertmanager.yml"
    env.update(ALERTMANAGER_TEMPLATE=str(ALERTMANAGER), ALERTMANAGER_CONFIG=str(config))
    sh = "sh"
    if shell == "busybox":
        directory = busybox_bin(tmp_path)
        if directory is None:
            pytest.skip("busybox is not installed")
        env["PATH"] = str(directory)
        sh = str(directory / "sh")
    completed = subprocess.run(
        [sh, str(ALERTMANAGER_ENTRYPOINT), "--render-only"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    return completed, config


def test_alertmanager_template_holds_no_secret_and_only_documented_placeholders():
    text = ALERTMANAGER.read_text()
    assert set(PLACEHOLDER.findall(text)) == ALERT_SETTINGS
    # Strings sit inside single quotes (the renderer doubles quotes in values);
    # only the chat id, an integer, is bare, and it is checked to be digits.
    for line in text.splitlines():
        for name in PLACEHOLDER.findall(line):
            bare = line.split("#", 1)[0].strip()
            if name == "ALERT_TELEGRAM_CHAT_ID":
                assert bare == f"chat_id: ${{{name}}}", line
            else:
                assert f"'${{{name}}}'" in bare, line


@pytest.mark.parametrize(
    "path",
    ["docker-compose.yml", "deploy/alertmanager.yml", "deploy/alertmanager-entrypoint.sh",
     "deploy/prometheus.yml", "deploy/alerts.yml", "deploy/blackbox.yml",
     "README.md"],
)
def test_no_bot_token_or_chat_id_is_written_in_a_deploy_file(path):
    text = (ROOT / path).read_text()
    assert TOKEN_LITERAL.findall(text) == []
    assert CHAT_ID_LITERAL.findall(text) == []


def test_alertmanager_routes_critical_to_email_and_telegram_and_inhibits_warnings():
    config = alertmanager_config()
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert set(receivers) == {"telegram", "email"}
    assert set(receivers["telegram"]) == {"name", "telegram_configs"}
    assert set(receivers["email"]) == {"name", "email_configs"}
    route = config["route"]
    assert seconds(route["group_wait"]) <= 15
    assert "alertname" in route["group_by"]
    inhibit = config["inhibit_rules"][0]
    assert inhibit["source_matchers"] == ['severity="critical"', 'symptom=~".+"']
    assert inhibit["target_matchers"] == ['severity="warning"', 'symptom=~".+"']
    assert "symptom" in inhibit["equal"]


@pytest.mark.parametrize("shell", ["system", "busybox"])
def test_alertmanager_entrypoint_renders_the_environment_into_the_config(tmp_path, shell):
    completed, config = render_alertmanager(tmp_path, shell)

    assert completed.returncode == 0, completed.stderr
    rendered = yaml.safe_load(config.read_text())
    [telegram] = rendered["receivers"][0]["telegram_configs"]
    assert telegram["bot_token"] == DUMMY_ALERT_ENV["ALERT_TELEGRAM_BOT_TOKEN"]
    assert telegram["chat_id"] == int(DUMMY_ALERT_ENV["ALERT_TELEGRAM_CHAT_ID"])
    assert rendered["receivers"][1]["email_configs"][0]["to"] == DUMMY_ALERT_ENV["ALERT_EMAIL_TO"]
    assert rendered["global"]["smtp_auth_password"] == DUMMY_ALERT_ENV["ALERT_SMTP_PASSWORD"]
    assert rendered["global"]["smtp_smarthost"] == DUMMY_ALERT_ENV["ALERT_SMTP_HOST"]
    # Only the container user may read the copy with the token.
    assert config.stat().st_mode & 0o077 == 0


def test_alertmanager_entrypoint_without_smtp_user_renders_no_authentication(tmp_path):
    completed, config = render_alertmanager(
        tmp_path, ALERT_SMTP_USER=None, ALERT_SMTP_PASSWORD=None
    )
    assert completed.returncode == 0, completed.stderr
    rendered = yaml.safe_load(config.read_text())["global"]
    assert rendered["smtp_auth_username"] == "" and rendered["smtp_auth_password"] == ""


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"ALERT_TELEGRAM_BOT_TOKEN": None}, "ALERT_TELEGRAM_BOT_TOKEN"),
        ({"ALERT_TELEGRAM_CHAT_ID": "", "ALERT_EMAIL_TO": None},
         "ALERT_TELEGRAM_CHAT_ID ALERT_EMAIL_TO"),
        ({"ALERT_TELEGRAM_CHAT_ID": "@my_channel"}, "ALERT_TELEGRAM_CHAT_ID must be a number"),
        ({"ALERT_TELEGRAM_BOT_TOKEN": "'123:abc'"}, "ALERT_TELEGRAM_BOT_TOKEN does not look"),
        ({"ALERT_SMTP_HOST": "smtp.example.com"}, "ALERT_SMTP_HOST must be host:port"),
        ({"ALERT_SMTP_PASSWORD": "two\nlines"}, "ALERT_SMTP_PASSWORD holds a line break"),
    ],
)
def test_alertmanager_entrypoint_refuses_with_one_line(tmp_path, overrides, says):
    completed, config = render_alertmanager(tmp_path, **overrides)

    assert completed.returncode != 0
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], lines
    assert not config.exists()


needs_amtool = pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed")


def amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["amtool", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def rendered_alertmanager(tmp_path) -> Path:
    completed, config = render_alertmanager(tmp_path)
    assert completed.returncode == 0, completed.stderr
    return config


@needs_amtool
def test_amtool_accepts_the_rendered_config(rendered_alertmanager):
    completed = amtool("check-config", str(rendered_alertmanager))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SUCCESS" in completed.stdout


@needs_amtool
def test_amtool_rendering_of_the_template_itself_fails():
    # Unrendered, the chat id is no integer: the template alone never starts mute.
    assert amtool("check-config", str(ALERTMANAGER)).returncode != 0


@needs_amtool
@pytest.mark.parametrize(
    ("severity", "receivers"),
    [("critical", "email,telegram"), ("warning", "telegram")],
)
def test_amtool_routes_each_severity(rendered_alertmanager, severity, receivers):
    completed = amtool(
        "config", "routes", "test", f"--config.file={rendered_alertmanager}",
        f"--verify.receivers={receivers}", f"severity={severity}", "alertname=AiChatTest",
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == receivers


@needs_amtool
def test_amtool_routes_every_alert_rule_to_telegram(rendered_alertmanager, alert_rules):
    wrong = {}
    for found in alert_rules:
        labels = {"alertname": found["alert"], **found["labels"]}
        completed = amtool(
            "config", "routes", "test", f"--config.file={rendered_alertmanager}",
            *(f"{key}={value}" for key, value in labels.items()),
        )
        expected = "email,telegram" if found["labels"]["severity"] == "critical" else "telegram"
        if completed.stdout.strip() != expected:
            wrong[found["alert"]] = completed.stdout.strip() or completed.stderr
    assert wrong == {}


@needs_amtool
def test_amtool_renders_the_telegram_message_with_escaped_values(tmp_path):
    [telegram] = alertmanager_config()["receivers"][0]["telegram_configs"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps({
        "receiver": "telegram", "status": "firing", "externalURL": "http://alertmanager:9093",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "alerts": [
            {"status": "firing",
             "labels": {"alertname": "AiChatApiLatencyHigh", "severity": "warning"},
             "annotations": {"summary": "p99 > 3 s", "description": "LLM <slow> & queue"}},
            {"status": "resolved",
             "labels": {"alertname": "AiChatInstanceDown", "severity": "critical",
                        "instance": "ai-chat-1:9001"},
             "annotations": {"summary": "ai-chat-1:9001 is down", "description": "gone"}},
        ],
    }))
    completed = amtool(
        "template", "render", "--template.glob=/dev/null", f"--template.data={data}",
        f"--template.text={telegram['message']}",
    )
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    assert "<b>AiChatApiLatencyHigh</b> [warning]" in text
    assert "p99 &gt; 3 s" in text and "LLM &lt;slow&gt; &amp; queue" in text
    assert "resolved: <b>AiChatInstanceDown</b> [critical] ai-chat-1:9001" in text
    # A resolved alert is its summary only.
    assert "gone" not in text


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
