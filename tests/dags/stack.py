"""The Airflow stack of docker-compose.yml as separate local processes, for the stack test.

Postgres (metadata and data, from the test cluster), Redis, the CeleryExecutor with one
`airflow celery worker`, the FAB auth manager, api-server, scheduler, dag-processor and
triggerer, each on 127.0.0.1 with free ports; the lake on the S3 API server (moto) through
the `brandmon_aws` connection. Every process gets its own process group, and `stop()` kills
the groups (TERM, then KILL), so nothing outlives the test even when it fails.
Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from dags_helpers import DAGS, REPO

from tests.support.services import free_port

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
BRANDMON = str(Path(sys.executable).with_name("brandmon"))


class Stack:
    def __init__(self, base: Path, env: dict[str, str], api_port: int) -> None:
        self.base = base
        self.env = env
        self.api = f"http://127.0.0.1:{api_port}"
        self.procs: dict[str, subprocess.Popen] = {}  # the services: must keep running
        self.jobs: dict[str, subprocess.Popen] = {}  # commands run beside them: may end
        self._token: str | None = None

    # --- processes ------------------------------------------------------------------------

    def spawn(self, name: str, *cmd: str, env: dict[str, str] | None = None, job: bool = False) -> subprocess.Popen:
        """Start a service (or, `job=True`, a command that ends) in its own process group."""
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            list(cmd), env=env or self.env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg takes its children too
        )
        log.close()
        (self.jobs if job else self.procs)[name] = proc
        return proc

    def wait_job(self, name: str, timeout: float) -> str:
        """Wait for a job started with `spawn(job=True)`; its output, or an error with it."""
        proc = self.jobs[name]
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} not finished in {timeout}s:\n{self.log_tail(name)}") from None
        if proc.returncode != 0:
            raise AssertionError(f"{name} failed ({proc.returncode}):\n{self.log_tail(name, 6000)}")
        return (self.base / f"{name}.log").read_text(errors="replace")

    def run(self, *cmd: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
        proc = subprocess.Popen(
            list(cmd), env=env or self.env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:  # a timeout, a failure or an interrupt: its whole group goes
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-4000:]}")
        return stdout

    def airflow(self, *args: str, timeout: float = 300) -> str:
        return self.run(AIRFLOW, *args, timeout=timeout)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            tails = {n: self.log_tail(n) for n in dead}
            raise AssertionError(f"stack process(es) exited: {dead}\n{tails}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """TERM every process group, then KILL what is left (children that outlived their
        parent too); idempotent."""
        everything = [*self.procs.values(), *self.jobs.values()]
        for proc in everything:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in everything:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    # --- REST API ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, accept: str = "application/json",
                raw: bool = False) -> Any:
        if self._token is None:
            self._token = self._login()
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.api + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self._token}", "Accept": accept,
                     **({"Content-Type": "application/json"} if data else {})},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            payload = resp.read(20 * 1024 * 1024)
        return payload.decode("utf-8", "replace") if raw else json.loads(payload or b"null")

    def _login(self) -> str:
        req = urllib.request.Request(
            self.api + "/auth/token", method="POST",
            data=json.dumps({"username": self.env["STACK_ADMIN_USER"], "password": self.env["STACK_ADMIN_PASSWORD"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["access_token"]

    def wait_api(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(self.api + "/api/v2/monitor/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise AssertionError(f"api-server not up in {timeout}s:\n{self.log_tail('api-server')}")

    def wait_dags(self, dag_ids: set[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            found = {d["dag_id"] for d in self.request("GET", "/api/v2/dags?limit=100")["dags"]}
            if dag_ids <= found:
                errors = self.request("GET", "/api/v2/importErrors")
                assert errors["total_entries"] == 0, errors
                return
            time.sleep(1)
        raise AssertionError(f"DAGs not parsed in {timeout}s:\n{self.log_tail('dag-processor')}")

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=5000&order_by=id")["dag_runs"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        quoted = urllib.parse.quote(run_id, safe="")
        while time.monotonic() < deadline:
            self.check_alive()
            run = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(1)
        raise AssertionError(f"{dag_id} {run_id} not finished in {timeout}s:\n{self.log_tail('worker')}")


def stack_env(base: Path, *, metadata_url: str, redis_port: int, api_port: int, extra: dict[str, str]) -> dict[str, str]:
    """docker-compose.yml's x-airflow-common environment, on 127.0.0.1 and free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BRANDMON_", "AWS_"))}
    env.update({
        "AIRFLOW_HOME": str(base / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_url.replace("postgresql+psycopg2", "postgresql"),
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "5000",  # the test reads every run, event and task in one page
        "AIRFLOW__API_AUTH__JWT_SECRET": "stack-test-jwt-secret-0123456789abcdef",
        "AIRFLOW__API__SECRET_KEY": "stack-test-secret-key",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "true",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "false",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "true",
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "5",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env
