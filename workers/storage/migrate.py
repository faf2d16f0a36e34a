"""Schema migrations: plain .sql files in migrations/, applied in order.

Files are named NNNN_name.sql (version ranges: 0001-0009 storage, 0010-0019
polling collectors, 0020-0029 trades). Each pending file runs in its own
transaction together with its schema_migrations row, under a transaction-level
advisory lock keyed on the current schema: two processes migrating at once
serialize, and the second finds the work done. Re-running is a no-op.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from workers.errors import CollectorError

from .db import connect

log = logging.getLogger(__name__)

MIGRATION_TIMEOUT = 600.0  # seconds per statement: index builds on big tables take a while
_NAME = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")
# pg_advisory_xact_lock(int, int): a constant for "collectord migrations" and the schema.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('collectord.migrate'), hashtext(current_schema()))"
_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(CollectorError):
    """A migration file is misnamed/duplicated, or the schema is unusable."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath("migrations")))


def discover(directory: Path | None = None) -> list[Migration]:
    """The migration files in version order; raises MigrationError on a bad or duplicate name."""
    directory = directory or migrations_dir()
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name must be NNNN_name.sql: {path.name}")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations with version {version:04d}: {found[version].name}, {path.stem}")
        found[version] = Migration(version, path.stem, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def applied(conn) -> set[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return set()
        cur.execute("SELECT version FROM schema_migrations")
        return {row[0] for row in cur.fetchall()}


def migrate(dsn: str, *, directory: Path | None = None, connect_timeout: int = 10) -> list[int]:
    """Apply pending migrations to the DSN's current schema; return the versions applied now.

    In order: read the files; connect; then for each file not yet recorded, in
    one transaction: take the advisory lock, create schema_migrations if
    missing, re-check under the lock that the version is still pending, run
    the file, record it, commit. A failing file rolls back alone and raises
    (earlier versions stay applied).
    """
    pending = discover(directory)
    done: list[int] = []
    conn = connect(dsn, application_name="collectord:migrate", statement_timeout=MIGRATION_TIMEOUT,
                   connect_timeout=connect_timeout)
    try:
        known = applied(conn)
        conn.rollback()
        for migration in pending:
            if migration.version in known:
                continue
            with conn.cursor() as cur:
                cur.execute(_LOCK)
                cur.execute(_BOOKKEEPING)
                cur.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,))
                if cur.fetchone():  # another process applied it while we waited for the lock
                    conn.rollback()
                    continue
                try:
                    cur.execute(migration.sql)
                except Exception as err:
                    conn.rollback()
                    raise MigrationError(f"migration {migration.name} failed: {err}".strip()) from err
                cur.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            conn.commit()
            done.append(migration.version)
            log.info("applied migration %s", migration.name)
        if not done:
            # Still make sure the bookkeeping table exists (empty migrations dir).
            with conn.cursor() as cur:
                cur.execute(_LOCK)
                cur.execute(_BOOKKEEPING)
            conn.commit()
    finally:
        conn.close()
    return done


def current_version(dsn: str) -> int:
    """Highest applied version (0 when none)."""
    conn = connect(dsn, application_name="collectord:migrate")
    try:
        versions = applied(conn)
        return max(versions, default=0)
    finally:
        conn.close()
