# The image every Airflow service of docker-compose.yml runs: the official Airflow 3 image
# with brandmon (the `pipeline` package, its `brandmon` CLI and pinned dependencies) installed.
# DAG files are not baked in: compose mounts ./dags so they can change without a rebuild.
FROM apache/airflow:3.3.2-python3.11

ENV TF_CPP_MIN_LOG_LEVEL=2 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/brandmon
COPY --chown=airflow:0 pyproject.toml constraints.txt README.md ./
COPY --chown=airflow:0 pipeline ./pipeline

# Same pins as `make venv` (constraints.txt); apache-airflow==3.3.2 is pinned by pyproject,
# so pip never swaps the image's Airflow for another version.
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import pipeline.airflow_support, pipeline.cli" \
    && brandmon --help >/dev/null

# BRANDMON_HOME (author salt, caches) and the config mount point: named volumes mounted
# here start with this ownership, so the airflow user (uid 50000, group 0) can write.
USER root
RUN mkdir -p /opt/brandmon/var /opt/brandmon/config \
    && chown -R airflow:0 /opt/brandmon/var /opt/brandmon/config \
    && chmod -R g+rwX /opt/brandmon/var /opt/brandmon/config
USER airflow

WORKDIR /opt/airflow
