"""One typed settings object, read from environment variables and an optional YAML file.

Why one object: every entry point (CLI, Airflow task, test) builds the same `Settings`, so a
value has exactly one name and one default. This module is the only place in the package that
reads the process environment (a test keeps it so): `load_settings` for what a run is configured
with, and the small functions at the end for per-process facts read at the moment of use (the
lock TTL and host, S3 attempts, the Keras cache, the detect runtime, secrets the YAML names by
variable). The DAG files' parse-time knobs are the one exception: `pipeline.dag_settings`, kept
to the standard library so that parsing a DAG never imports this module's dependencies. Secrets are only ever read from the environment
(or injected by Airflow connections, see `pipeline.airflow_support`) and are wrapped in `Secret`
so that a stray `print(settings)` or log line cannot show them. Where the database URL came
from (`database_url_source`: the variable, or an Airflow connection id) travels with it, so an
error names the knob to fix; an S3 client built by Airflow's AWS hook (`s3_session`, a boto3
session with the connection's credentials, role or profile) replaces boto3's default chain.
"""

from __future__ import annotations

import contextlib
import os
import secrets as _secrets
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.alerts.config import AlertsConfig, check_catalogue, parse_alerts
from pipeline.errors import ConfigError, StorageError
from pipeline.redact import redact_url
from pipeline.sources.registry import KINDS, check_options, unknown_key

SOURCE_KINDS = KINDS  # the source registry's kinds (pipeline/sources/registry.py)


class Secret:
    """A string that never shows itself in repr/str/format; call `.get()` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Product:
    name: str
    keywords: tuple[str, ...] = ()
    hashtags: tuple[str, ...] = ()
    logo_classes: tuple[str, ...] = ()  # detector classes that show this product (else: its name)


@dataclass(frozen=True)
class Brand:
    """A catalogue entry: what text and images count as a mention of this brand."""

    name: str
    keywords: tuple[str, ...] = ()
    hashtags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    products: tuple[Product, ...] = ()
    logo_classes: tuple[str, ...] = ()  # detector classes that show this brand (else: its name)


@dataclass(frozen=True)
class SourceConfig:
    """One feed source. Kind-specific keys (base_url, hashtags, path, ...) live in `options`."""

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass(frozen=True)
class NetworkConfig:
    allowed_private_hosts: tuple[str, ...] = ()
    timeout_s: float = 20.0  # connect / silence between two reads
    deadline_s: float = 60.0  # wall clock for a whole request (an image: all its redirect hops)
    max_response_bytes: int = 32 * 1024 * 1024  # decoded bytes of one feed response
    max_image_bytes: int = 20 * 1024 * 1024  # decoded bytes of one image
    user_agent: str = "brandmon/0.1 (brand-monitoring pipeline; +https://github.com/brandmon/brandmon)"
    image_workers: int = 8
    per_host_connections: int = 4
    max_retries: int = 5


@dataclass(frozen=True)
class DetectorConfig:
    batch_size: int = 32
    score_floor: float = 0.05
    review_margin: float = 0.1
    mixed_precision: str = "auto"  # auto | bf16 | fp32
    threads: int = 0  # TensorFlow intra-op threads (0: all cores); env BRANDMON_TF_THREADS wins
    runtime: str = "auto"  # auto | keras | openvino | onnx | tflite | savedmodel; env BRANDMON_DETECT_RUNTIME wins


DEFAULT_DB_CONN_ID = "brandmon_db"
DEFAULT_AWS_CONN_ID = "brandmon_aws"


@dataclass(frozen=True)
class Settings:
    database_url: str
    storage_url: str
    s3_endpoint_url: str | None = None
    config_path: Path | None = None
    home: Path = Path("var")
    brands: tuple[Brand, ...] = ()
    sources: tuple[SourceConfig, ...] = ()
    network: NetworkConfig = NetworkConfig()
    detector: DetectorConfig = DetectorConfig()
    author_salt: Secret = Secret("")
    alerts: AlertsConfig = AlertsConfig()
    extra: dict[str, Any] = field(default_factory=dict)
    # what to fix when the database cannot be reached: the variable or the Airflow connection
    database_url_source: str = "BRANDMON_DATABASE_URL"
    # a boto3 Session for the lake (from an Airflow AWS connection); None: boto3's default chain
    s3_session: Any = field(default=None, repr=False, compare=False)
    s3_source: str = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an AWS profile)"
    # what to fix when the S3 endpoint cannot be reached: the variable or the Airflow connection
    s3_endpoint_source: str = "BRANDMON_S3_ENDPOINT_URL"
    # Airflow's REST API, for the events the CLI emits (`brandmon model activate`); None: off
    airflow_api_url: str | None = None
    airflow_api_user: str = ""
    airflow_api_password: Secret = Secret("")
    # the Airflow connections `pipeline.airflow_support.settings_from_airflow` looks for
    db_conn_id: str = DEFAULT_DB_CONN_ID
    aws_conn_id: str = DEFAULT_AWS_CONN_ID

    def source(self, name: str) -> SourceConfig:
        for src in self.sources:
            if src.name == name:
                return src
        known = ", ".join(s.name for s in self.sources) or "none configured"
        raise ConfigError(
            f"unknown source {name!r} (configured: {known}); add it under `sources:` in "
            f"{self.config_path or 'the BRANDMON_CONFIG file'}"
        )

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """What `brandmon status` prints: never a secret."""
        return {
            "database_url": redact_url(self.database_url),
            "storage_url": redact_url(self.storage_url),
            "s3_endpoint_url": redact_url(self.s3_endpoint_url) if self.s3_endpoint_url else None,
            "config": str(self.config_path) if self.config_path else None,
            "brands": [b.name for b in self.brands],
            "sources": [f"{s.name} ({s.kind})" for s in self.sources],
            "alerts": {"rules": [r.name for r in self.alerts.rules],
                       "destinations": [f"{d.name} ({d.kind})" for d in self.alerts.destinations]},
        }


def str_list(value: Any, where: str) -> tuple[str, ...]:
    """The one reader of option lists: a list of strings (numbers as text), a lone string as a
    list of one, nothing as (); else a ConfigError naming `where`."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {type(value).__name__}")
    return tuple(str(v) for v in value)



MAX_NAME_CHARS = 200
MAX_SOURCE_NAME_CHARS = 100


def _parse_brand(raw: Any, i: int) -> Brand:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise ConfigError(f"brands[{i}] needs a `name` (a non-empty string)")
    name = raw["name"].strip()
    if len(name) > MAX_NAME_CHARS:  # the database columns hold 200
        raise ConfigError(f"brands[{i}].name is longer than {MAX_NAME_CHARS} characters ({name[:40]!r}...)")
    products = []
    for j, p in enumerate(raw.get("products") or []):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise ConfigError(f"brands[{i}].products[{j}] needs a `name`")
        if len(p["name"].strip()) > MAX_NAME_CHARS:
            raise ConfigError(f"brands[{i}].products[{j}].name is longer than {MAX_NAME_CHARS} characters")
        products.append(
            Product(
                name=p["name"].strip(),
                keywords=str_list(p.get("keywords"), f"brands[{i}].products[{j}].keywords"),
                hashtags=str_list(p.get("hashtags"), f"brands[{i}].products[{j}].hashtags"),
                logo_classes=str_list(p.get("logo_classes"), f"brands[{i}].products[{j}].logo_classes"),
            )
        )
    return Brand(
        name=name,
        keywords=str_list(raw.get("keywords"), f"brands[{i}].keywords"),
        hashtags=str_list(raw.get("hashtags"), f"brands[{i}].hashtags"),
        aliases=str_list(raw.get("aliases"), f"brands[{i}].aliases"),
        accounts=str_list(raw.get("accounts"), f"brands[{i}].accounts"),
        exclude=str_list(raw.get("exclude"), f"brands[{i}].exclude"),
        products=tuple(products),
        logo_classes=str_list(raw.get("logo_classes"), f"brands[{i}].logo_classes"),
    )


def _parse_source(raw: Any, i: int) -> SourceConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"sources[{i}] must be a mapping with `name` and `kind`")
    name, kind = raw.get("name"), raw.get("kind")
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"sources[{i}].name must be letters, digits, '-' or '_' (got {name!r})")
    if len(name) > MAX_SOURCE_NAME_CHARS:  # it goes into lock names and 128-character columns
        raise ConfigError(f"sources[{i}].name is longer than {MAX_SOURCE_NAME_CHARS} characters ({name[:40]!r}...)")
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"sources[{i}] ({name}): kind must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
    options = check_options(name, kind, {k: v for k, v in raw.items() if k not in ("name", "kind")})
    return SourceConfig(name=name, kind=kind, options=options)


def _typed_section(raw: Any, cls: type, where: str) -> dict[str, Any]:
    """The known keys of a `network:`/`detector:` mapping, each checked against its default's type."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping (key: value lines), got {type(raw).__name__} {raw!r}")
    out: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        if key not in cls.__dataclass_fields__:
            unknown_key(where, str(key), sorted(cls.__dataclass_fields__))
            continue
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            value = str_list(value, f"{where}.{key}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            low = 0 if key in ("max_retries", "threads") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{where}.{key} must be a whole number of at least {low}, got {value!r}")
        elif isinstance(default, float):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"{where}.{key} must be a number (0 or more), got {value!r}")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
        out[key] = value
    return out


def parse_config_document(doc: Any, where: str = "config") -> dict[str, Any]:
    """Validate the YAML contract (brands, sources, network, detector, alerts) into typed parts."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: the top level must be a mapping (brands:, sources:, ...)")
    brands = tuple(_parse_brand(b, i) for i, b in enumerate(doc.get("brands") or []))
    names = [b.name.casefold() for b in brands]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: brand names must be unique (case-insensitive)")
    sources = tuple(_parse_source(s, i) for i, s in enumerate(doc.get("sources") or []))
    if len({s.name for s in sources}) != len(sources):
        raise ConfigError(f"{where}: source names must be unique")
    network = NetworkConfig(**_typed_section(doc.get("network"), NetworkConfig, f"{where}: `network`"))
    detector = DetectorConfig(**_typed_section(doc.get("detector"), DetectorConfig, f"{where}: `detector`"))
    if detector.mixed_precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"{where}: `detector`.mixed_precision must be auto, bf16 or fp32, got {detector.mixed_precision!r}")
    if detector.runtime not in ("auto", "keras", "openvino", "onnx", "tflite", "savedmodel"):
        raise ConfigError(f"{where}: `detector`.runtime must be auto, keras, openvino, onnx, tflite or savedmodel, "
                          f"got {detector.runtime!r}")
    alerts = parse_alerts(doc.get("alerts"), f"{where}: alerts")
    alerts = check_catalogue(alerts, {b.name: [p.name for p in b.products] for b in brands}, f"{where}: alerts")
    extra = {k: v for k, v in doc.items() if k not in ("brands", "sources", "network", "detector", "alerts")}
    return {"brands": brands, "sources": sources, "network": network, "detector": detector, "alerts": alerts,
            "extra": extra}


MAX_CONFIG_BYTES = 10_000_000


def load_config_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"BRANDMON_CONFIG points at {path}, which is a folder; point it at the YAML file")
    if not path.is_file():
        raise ConfigError(f"BRANDMON_CONFIG points at {path}, which does not exist (or is not a regular file); "
                          "create it or unset the variable")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"BRANDMON_CONFIG points at {path}, which cannot be read ({exc.strerror}); "
                          "fix its permissions or point BRANDMON_CONFIG at a readable copy") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1_000_000} MB; is BRANDMON_CONFIG the right file?")
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}; fix the file and retry") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"{path}: malformed YAML: nested too deeply; fix the file and retry") from None
    return parse_config_document(doc, where=str(path))


def check_storage_url(url: str) -> str:
    """Accept file:///abs, a plain path, or s3://bucket[/prefix]; say how to fix anything else."""
    from pipeline.objectstore import parse_storage_url  # which imports this module

    parts = parse_storage_url(url)
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise ConfigError(
            f"BRANDMON_STORAGE_URL={url!r} names host {parts.netloc!r}, so it would point at {parts.raw_path or '/'}; "
            "a file URL needs an absolute path after three slashes (file:///abs/path), or give a plain path "
            f"such as ./{parts.netloc}{parts.raw_path}"
        )
    if parts.scheme in ("", "file"):
        return url
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"BRANDMON_STORAGE_URL={url!r} has no bucket; use s3://bucket/prefix")
        return url
    raise ConfigError(
        f"BRANDMON_STORAGE_URL has unknown scheme {parts.scheme!r}; use file:///abs/path or s3://bucket/prefix"
    )


def check_database_url(url: str, source: str = "BRANDMON_DATABASE_URL") -> str:
    """The URL if SQLAlchemy can use it; else a ConfigError naming `source` (the variable, or
    the Airflow connection the URL was built from)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    name = source if " " in source else f"{source}={redact_url(url)!r}"
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - make_url may leave a bad port for later
    except ValueError as exc:
        if "int()" in str(exc) or "port" in str(exc).lower():
            raise ConfigError(
                f"BRANDMON_DATABASE_URL={redact_url(url)!r} has a port that is not a number; "
                "write host:PORT with digits (e.g. db:5432), or leave the port out for the default"
            ) from None
        raise ConfigError(f"BRANDMON_DATABASE_URL={redact_url(url)!r} cannot be read as a database URL") from None
    except ArgumentError:
        raise ConfigError(
            f"{name} is not a SQLAlchemy URL; "
            "use e.g. sqlite:///var/brandmon.db or postgresql+psycopg2://user:pass@host/db"
        ) from None
    if url.split("://", 1)[-1].count("@") > 1:
        # an unencoded `@` in the password (or the query): SQLAlchemy takes a piece of the
        # password as the host (looked up in DNS, shown in errors) and another as the database
        raise ConfigError(
            f"BRANDMON_DATABASE_URL={redact_url(url)!r} has more than one `@`: a password holding `@` must "
            "write it as %40 (and `/` as %2F, `?` as %3F, `#` as %23)"
        )
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"{source} uses {parsed.get_backend_name()!r}; brandmon supports sqlite and postgresql"
        )
    default_driver = "postgresql+psycopg2" if parsed.get_backend_name() == "postgresql" else "sqlite"
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise ConfigError(
            f"{source} names an unknown database driver {parsed.drivername!r}; "
            f"use {default_driver}://..."
        ) from None
    except ImportError as exc:
        raise ConfigError(
            f"{source} uses the driver {parsed.get_driver_name()!r}, whose module "
            f"{getattr(exc, 'name', None) or parsed.get_driver_name()!r} is not installed; use {default_driver}://... "
            f"(installed) or pip install it"
        ) from None
    return url


def _salt(home: Path, env: dict[str, str]) -> Secret:
    """The author-hash salt: from BRANDMON_AUTHOR_SALT, else a per-installation file (mode 600).

    Two processes may start at once on a fresh BRANDMON_HOME: each writes its candidate to a
    private temp file and hard-links it into place, which either creates the complete file or
    fails because the other won; the loser then reads the winner's salt. A reader therefore
    never sees a half-written file, and everyone ends with the same salt.
    """
    value = env.get("BRANDMON_AUTHOR_SALT")
    if value:
        return Secret(value)
    path = home / "author_salt"
    if not path.is_file():
        try:
            home.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=home, prefix=".author_salt-")  # mode 600
        except OSError as exc:
            raise ConfigError(
                f"cannot create the author salt in {home}: {exc.strerror}; make BRANDMON_HOME writable "
                "or set BRANDMON_AUTHOR_SALT"
            ) from None
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(_secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process won: use its salt
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    value = path.read_text().strip()
    if not value:
        raise ConfigError(
            f"the author salt file {path} is empty; restore it from a backup (author hashes depend on it), "
            "or delete it to start a new salt, or set BRANDMON_AUTHOR_SALT"
        )
    return Secret(value)


def _detector_env(detector: DetectorConfig, env: dict[str, str]) -> DetectorConfig:
    """BRANDMON_TF_THREADS over `detector.threads`: a worker's cores are a deployment fact."""
    raw = env.get("BRANDMON_TF_THREADS")
    if not raw:
        return detector
    try:
        threads = int(raw)
        if threads < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"BRANDMON_TF_THREADS must be a whole number (0 = all cores), got {raw!r}") from None
    return replace(detector, threads=threads)


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build `Settings` from the environment (default: os.environ) and BRANDMON_CONFIG."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("BRANDMON_HOME", "var")).expanduser()
    config_path = Path(env["BRANDMON_CONFIG"]).expanduser() if env.get("BRANDMON_CONFIG") else None
    parts: dict[str, Any] = load_config_file(config_path) if config_path else parse_config_document({})
    extra = parts["extra"]
    database_url = env.get("BRANDMON_DATABASE_URL") or extra.get("database_url") or f"sqlite:///{(home / 'brandmon.db').resolve()}"
    storage_url = env.get("BRANDMON_STORAGE_URL") or extra.get("storage_url") or (home / "lake").resolve().as_uri()
    settings = Settings(
        database_url=check_database_url(str(database_url)),
        storage_url=check_storage_url(str(storage_url)),
        s3_endpoint_url=env.get("BRANDMON_S3_ENDPOINT_URL") or extra.get("s3_endpoint_url") or None,
        config_path=config_path,
        home=home,
        brands=parts["brands"],
        sources=parts["sources"],
        network=parts["network"],
        detector=_detector_env(parts["detector"], env),
        author_salt=_salt(home, env),
        alerts=parts["alerts"],
        extra=extra,
        airflow_api_url=env.get("BRANDMON_AIRFLOW_API_URL") or None,
        airflow_api_user=env.get("BRANDMON_AIRFLOW_USER") or "",
        airflow_api_password=Secret(env.get("BRANDMON_AIRFLOW_PASSWORD") or ""),
        db_conn_id=env.get("BRANDMON_DB_CONN_ID") or DEFAULT_DB_CONN_ID,
        aws_conn_id=env.get("BRANDMON_AWS_CONN_ID") or DEFAULT_AWS_CONN_ID,
    )
    return settings.with_overrides(**overrides) if overrides else settings


def workdir_settings(workdir: Path, config_path: Path) -> Settings:
    """Settings for a self-contained WORKDIR (the demo): its own SQLite file, lake and home and
    the given config, whatever BRANDMON_* says; only the author salt is inherited, so that a set
    BRANDMON_AUTHOR_SALT hashes authors the same way there too."""
    env = {
        "BRANDMON_HOME": str(workdir / "var"),
        "BRANDMON_DATABASE_URL": f"sqlite:///{workdir / 'brandmon.db'}",
        "BRANDMON_STORAGE_URL": (workdir / "lake").as_uri(),
        "BRANDMON_CONFIG": str(config_path),
    }
    if os.environ.get("BRANDMON_AUTHOR_SALT"):
        env["BRANDMON_AUTHOR_SALT"] = os.environ["BRANDMON_AUTHOR_SALT"]
    return load_settings(env=env)


# --- Per-process knobs, read at the moment of use ---------------------------------------------
# Deployment facts of one process (this host's name, the AWS SDK's retry count, the Keras
# cache) rather than of a run's configuration: read when used, so a bad value fails the one
# operation that needs it with a line naming the variable, as it always has.

DEFAULT_LOCK_TTL_S = 120.0
MIN_LOCK_TTL_S = 1.0  # a heartbeat every ttl/4 seconds: shorter would hammer the database
MAX_LOCK_TTL_S = 7 * 86400.0  # a crashed run's window must come free within a week
MAX_LOCK_HOST_CHARS = 100  # lock owners are `host:pid` in 128-character columns
DEFAULT_S3_ATTEMPTS = 9
# Secrets that may sit in the environment and must never reach a failure summary.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "BRANDMON_AUTHOR_SALT")


def environ() -> Mapping[str, str]:
    """The live process environment, for secrets the YAML names by variable (a source's
    `token_env`, an alert destination's `url_env`): their names are only known at use."""
    return os.environ


def child_env(import_root: str) -> dict[str, str]:
    """This process's environment for a Python child that must import the package from
    `import_root` first (the quantiser runs `python -m pipeline...` in a bounded child)."""
    path = [import_root, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def lock_ttl_s() -> float:
    """Seconds a lock outlives its holder's last heartbeat: BRANDMON_LOCK_TTL_S, default 120."""
    raw = os.environ.get("BRANDMON_LOCK_TTL_S")
    if not raw:
        return DEFAULT_LOCK_TTL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not MIN_LOCK_TTL_S <= value <= MAX_LOCK_TTL_S:  # also refuses nan and inf
        raise ConfigError(
            f"BRANDMON_LOCK_TTL_S={raw!r} must be a number of seconds from {MIN_LOCK_TTL_S:g} to "
            f"{MAX_LOCK_TTL_S:g} (default {DEFAULT_LOCK_TTL_S:g})"
        )
    return value


def lock_host() -> str:
    """This machine in lock owners: BRANDMON_LOCK_HOST (set it where machines share a hostname)."""
    host = os.environ.get("BRANDMON_LOCK_HOST") or socket.gethostname()
    if len(host) > MAX_LOCK_HOST_CHARS:
        raise ConfigError(f"BRANDMON_LOCK_HOST is longer than {MAX_LOCK_HOST_CHARS} characters ({host[:40]!r}...); "
                          "set a shorter name")
    return host


def s3_max_attempts() -> int:
    """boto3's attempts per S3 call, the first included (throttling, 5xx and dropped connections
    are retried with backoff): AWS_MAX_ATTEMPTS as the AWS SDKs read it, default 9."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_S3_ATTEMPTS)
    if not raw.isdigit() or int(raw) < 1:
        raise StorageError(f"AWS_MAX_ATTEMPTS={raw!r} must be a whole number of at least 1 (default {DEFAULT_S3_ATTEMPTS})")
    return int(raw)


def keras_home() -> Path:
    """Keras' cache folder (base weights live in its `models/`): KERAS_HOME, else ~/.keras."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def imagenet_mirror() -> str | None:
    """BRANDMON_IMAGENET_URL: where to fetch the ImageNet base weights instead of Keras' URL."""
    return os.environ.get("BRANDMON_IMAGENET_URL") or None


def detect_runtime(configured: str | None) -> str:
    """BRANDMON_DETECT_RUNTIME over `detector.runtime` (`configured`), lower-cased; unchecked."""
    return (os.environ.get("BRANDMON_DETECT_RUNTIME") or configured or "auto").strip().lower()


def secret_env_values() -> list[str]:
    """The values of the SECRET_ENV variables that are set: known secrets to scrub from text."""
    return [v for v in (os.environ.get(k, "") for k in SECRET_ENV) if v]


def quiet_native_logs() -> None:
    """Hide TensorFlow's C++ start-up chatter (oneDNN, CPU features) unless the user set
    TF_CPP_MIN_LOG_LEVEL: noise for a command-line user."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
