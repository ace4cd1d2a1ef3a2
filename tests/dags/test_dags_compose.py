"""docker-compose.yml: valid for `docker-compose config -q`, and wired the way README says."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dags_helpers import REPO

COMPOSE = REPO / "docker-compose.yml"
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_config_is_valid(tmp_path: Path):
    exe = shutil.which("docker-compose")
    assert exe is not None, (
        "docker-compose binary missing (Debian: apt-get install docker-compose); CI needs it"
    )
    proc = subprocess.run(
        [exe, "-f", str(COMPOSE), "--project-directory", str(REPO), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # no stray .env next to the caller
    )
    assert proc.returncode == 0, proc.stderr


def test_services_and_one_shot_initialisers(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "redis"} | AIRFLOW_SERVICES <= set(services)
    init = "\n".join(services["airflow-init"]["command"])
    for step in ("airflow db migrate", "brandmon db upgrade", "airflow pools set"):
        assert step in init
    assert "mc mb --ignore-existing" in "\n".join(services["minio-init"]["command"])
    assert services["postgres"]["volumes"][1].endswith(
        "/docker-entrypoint-initdb.d/10-databases.sh:ro"
    )
    assert (REPO / "docker" / "postgres" / "init-databases.sh").is_file()


def test_airflow_services_share_the_project_image_dags_and_connections(compose):
    for name in AIRFLOW_SERVICES:
        svc = compose["services"][name]
        assert svc["build"] == "." and svc["image"].startswith("${BRANDMON_IMAGE:-brandmon-airflow")
        assert "./dags:/opt/airflow/dags:ro" in svc["volumes"]
        assert "${BRANDMON_DATA_DIR:-./data}:/opt/brandmon/data:ro" in svc["volumes"]
        env = svc["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        for conn in ("AIRFLOW_CONN_BRANDMON_DB", "AIRFLOW_CONN_BRANDMON_AWS"):
            # the defaults interpolated, the value is a connection in Airflow's JSON form
            value = env[conn].replace("${BRANDMON_DB_PASSWORD:-brandmon}", "pw")
            value = value.replace("${MINIO_ROOT_USER:-brandmon}", "u").replace(
                "${MINIO_ROOT_PASSWORD:-brandmon-minio}", "pw"
            )
            parsed = json.loads(value)
            assert parsed["conn_type"] in ("postgres", "aws")
        assert env["BRANDMON_STORAGE_URL"].startswith("s3://")
        assert env["BRANDMON_DB_CONN_ID"] == "${BRANDMON_DB_CONN_ID:-brandmon_db}"
        assert env["BRANDMON_AWS_CONN_ID"] == "${BRANDMON_AWS_CONN_ID:-brandmon_aws}"


def test_worker_scales_out(compose):
    worker = compose["services"]["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker  # N copies can coexist
    assert worker["command"] == "celery worker"


def test_dockerfile_installs_the_project_with_constraints():
    text = (REPO / "Dockerfile").read_text()
    assert "\nFROM apache/airflow:3.3.2-python3.11\n" in text
    assert "-c constraints.txt ." in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
