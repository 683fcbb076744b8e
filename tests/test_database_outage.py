"""Database outage (issue part 4).

The service runs under gunicorn on a throwaway PostgreSQL cluster of its own
(tests/pg_cluster.py), with sends going on for several users. The cluster is
stopped under that load and later started again on the same port. While it
is down every send answers 503 ``database_unavailable`` (JSON, Russian
message), never a 500 and never a hang; ``/health`` stays 200 and
``/health/ready`` answers 503. After the restart the same server process
answers again, and for every user the counter, the stored rows and the 200
answers given agree.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests import pg_cluster
from tests.conftest import API_KEY, base_env, counters_and_rows, migrate_to_head
from tests.servers import Gunicorn

LOAD_THREADS = 6
USERS = tuple(range(8001, 8013))
# Sends fired while the database is down, outside the load's users.
PROBE_USER = 8099
# Bounds of the load: sends per thread, and seconds before it gives up.
MAX_SENDS_PER_THREAD = 2000
MAX_LOAD_SECONDS = 60
SEND_TIMEOUT = 10
FAILURE_PAUSE = 0.05
ANSWERS_BEFORE_THE_STOP = 20
OUTAGE_SECONDS = 3.0
RECOVERY_SECONDS = 20.0
CYRILLIC = re.compile(r"[А-Яа-яЁё]")


def child_pids(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (gunicorn's workers)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


class Load:
    """A few threads sending for several users in a bounded loop; every send is
    recorded with when it started and ended and what came back."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(LOAD_THREADS)
        ]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=SEND_TIMEOUT + 5)

    def _run(self, index: int) -> None:
        give_up_at = time.monotonic() + MAX_LOAD_SECONDS
        mine = USERS[index::LOAD_THREADS]
        session = requests.Session()
        try:
            for number in range(MAX_SENDS_PER_THREAD):
                if self._stop.is_set() or time.monotonic() > give_up_at:
                    return
                record = self._send(session, mine[number % len(mine)], number)
                self._record(record)
                if record["status"] != 200:
                    # A client backs off a little after a failure; it also keeps
                    # the bounded number of sends from running out mid-outage.
                    time.sleep(FAILURE_PAUSE)
        finally:
            session.close()

    def _send(self, session, telegram_id: int, number: int) -> dict:
        record = {"telegram_id": telegram_id, "started": time.monotonic()}
        try:
            response = session.post(
                f"{self.base_url}/v1/chat/send",
                json={"telegram_id": telegram_id, "message": f"Вопрос {number}"},
                headers={"X-API-KEY": API_KEY},
                timeout=SEND_TIMEOUT,
            )
        except requests.RequestException as error:
            record.update(status=None, failure=type(error).__name__)
        else:
            record["status"] = response.status_code
            record["content_type"] = response.headers.get("Content-Type", "")
            try:
                record["body"] = response.json()
            except ValueError:
                record["body"] = response.text[:300]
        record["finished"] = time.monotonic()
        return record

    def _record(self, record: dict) -> None:
        with self._lock:
            self.records.append(record)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.records)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Poll the records until ``predicate(records)`` holds (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.05)
        return False


def probe(url: str) -> tuple[int | None, object]:
    try:
        response = requests.get(url, timeout=SEND_TIMEOUT)
    except requests.RequestException as error:
        return None, type(error).__name__
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text[:300]


@pytest.fixture(scope="module")
def outage(_fake_llm_server, tmp_path_factory):
    """Run the whole outage once and return what was observed."""
    reason = pg_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    fake = _fake_llm_server
    fake.reset()
    fake.latency = 0.1
    seen: dict = {}
    try:
        with pg_cluster.PgCluster() as cluster:
            migrate_to_head(cluster.url())
            env = {
                **base_env(cluster.url(), fake.url),
                "DAILY_LIMIT": "1000",
                "OPENAI_TIMEOUT": "2",
                "LLM_DEADLINE": "4",
            }
            server = Gunicorn(env, workers=1, threads=16, log_dir=tmp_path_factory.mktemp("db"))
            with server:
                seen["workers_before"] = child_pids(server.process.pid)
                load = Load(server.url).start()
                try:
                    seen.update(run_outage(cluster, server, load))
                finally:
                    load.stop()
                seen["records"] = load.snapshot()
                seen["master_alive"] = server.process.poll() is None
                seen["workers_after"] = child_pids(server.process.pid)
                seen["ready_after"] = probe(f"{server.url}/health/ready")
                seen["log"] = server.log()
            seen["counters"], seen["rows"] = counters_and_rows(cluster.dsn())
    finally:
        fake.reset()
    return seen


def run_outage(cluster: pg_cluster.PgCluster, server: Gunicorn, load: Load) -> dict:
    """Stop the cluster under load, probe, start it again, wait for answers."""
    answered = load.wait_for(
        lambda records: sum(r["status"] == 200 for r in records) >= ANSWERS_BEFORE_THE_STOP,
        timeout=20,
    )
    assert answered, f"no answers before the stop: {Counter(r['status'] for r in load.snapshot())}"

    stopping_at = time.monotonic()
    cluster.stop("immediate")
    stopped_at = time.monotonic()
    probes = []
    # The load threads may all be busy saving answers that straddle the stop
    # (the service retries those writes), so fresh sends are probed here too.
    send_probes = []
    with requests.Session() as session:
        while time.monotonic() < stopped_at + OUTAGE_SECONDS:
            probes.append((probe(f"{server.url}/health"), probe(f"{server.url}/health/ready")))
            send_probes.append(load._send(session, PROBE_USER, len(send_probes)))
            time.sleep(0.2)

    restarting_at = time.monotonic()
    cluster.start()
    restarted_at = time.monotonic()
    recovered = load.wait_for(
        lambda records: any(
            r["started"] >= restarted_at and r["status"] == 200 for r in records
        ),
        timeout=RECOVERY_SECONDS,
    )
    return {
        "stopping_at": stopping_at,
        "stopped_at": stopped_at,
        "restarting_at": restarting_at,
        "restarted_at": restarted_at,
        "probes": probes,
        "send_probes": send_probes,
        "recovered": recovered,
    }


def sends_during_the_outage(outage) -> list[dict]:
    """Sends that began after the cluster was down and ended before its restart."""
    return [
        record for record in all_sends(outage)
        if record["started"] >= outage["stopped_at"]
        and record["finished"] <= outage["restarting_at"]
    ]


def all_sends(outage) -> list[dict]:
    return outage["records"] + outage["send_probes"]


def answers_per_user(outage) -> dict[int, int]:
    answers = {user: 0 for user in USERS}
    for record in outage["records"]:
        if record["status"] == 200:
            answers[record["telegram_id"]] += 1
    return answers


# --- while the database is down --------------------------------------------------


def test_sends_during_the_outage_answer_503_database_unavailable(outage):
    during = sends_during_the_outage(outage)
    assert len(during) >= OUTAGE_SECONDS / 0.5
    assert Counter(
        (record["status"], record["body"].get("error") if isinstance(record["body"], dict)
         else record["body"])
        for record in during
    ) == {(503, "database_unavailable"): len(during)}


def test_outage_answers_are_json_with_a_russian_message(outage):
    refused = [record for record in all_sends(outage) if record["status"] == 503]
    assert refused
    for record in refused:
        assert record["content_type"].startswith("application/json")
        body = record["body"]
        assert set(body) == {"error", "message", "detail"}
        assert body["detail"] == {"error": body["error"], "message": body["message"]}
        assert CYRILLIC.search(body["message"])


def test_no_send_hangs_or_fails_with_another_server_error(outage):
    failures = [
        (record["status"], record.get("failure") or record.get("body"))
        for record in all_sends(outage)
        if record["status"] is None
        or (record["status"] >= 500 and record["status"] != 503)
        or (record["status"] == 503 and record["body"].get("error") != "database_unavailable")
    ]
    assert failures == []


def test_every_send_answers_200_or_503(outage):
    assert {record["status"] for record in all_sends(outage)} == {200, 503}


def test_liveness_answers_200_while_the_database_is_down(outage):
    liveness = [health for health, _ in outage["probes"]]
    assert len(liveness) >= 3
    assert all(status == 200 and body["status"] == "ok" for status, body in liveness), liveness


def test_readiness_answers_503_while_the_database_is_down(outage):
    readiness = [ready for _, ready in outage["probes"]]
    assert len(readiness) >= 3
    assert all(
        status == 503 and body["status"] == "unavailable"
        and body["checks"]["database"] == "unavailable"
        for status, body in readiness
    ), readiness


def test_unexpected_errors_are_never_logged_during_the_outage(outage):
    assert "unexpected error" not in outage["log"]
    assert "Traceback" not in outage["log"]


# --- after the restart ------------------------------------------------------------


def test_the_same_process_answers_sends_again_after_the_restart(outage):
    assert outage["recovered"]
    assert outage["master_alive"]
    assert outage["workers_before"] and outage["workers_after"] == outage["workers_before"]


def test_readiness_answers_200_again_after_the_restart(outage):
    status, body = outage["ready_after"]
    assert status == 200
    assert body["checks"]["database"] == "ok"


def test_counters_equal_the_answers_given_after_the_outage(outage):
    counters = {user: outage["counters"].get(user, 0) for user in USERS}
    assert counters == answers_per_user(outage)


def test_every_answer_given_across_the_outage_is_stored(outage):
    rows = {user: outage["rows"].get(user, 0) for user in USERS}
    assert rows == answers_per_user(outage)
