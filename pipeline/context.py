"""The handles a job needs (settings, database engine, object store), built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from sqlalchemy import Engine

from pipeline.database import make_engine, require_schema
from pipeline.objectstore import ObjectStore, open_store
from pipeline.settings import Settings, load_settings


@dataclass
class Context:
    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(
            self.settings.storage_url,
            self.settings.s3_endpoint_url,
            session=self.settings.s3_session,
            credentials_hint=self.settings.s3_source,
            endpoint_hint=self.settings.s3_endpoint_source,
        )

    def ready(self) -> Context:
        """Check that the database schema is current and the lake is reachable."""
        require_schema(self.engine, self.settings.database_url_source)
        self.store.check()
        return self

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()


def open_context(settings: Settings | None = None, check: bool = True) -> Context:
    ctx = Context(settings or load_settings())
    return ctx.ready() if check else ctx
