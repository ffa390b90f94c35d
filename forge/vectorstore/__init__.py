"""Collections of embeddings in PostgreSQL with pgvector (see ``store.VectorStore``)."""

from forge.vectorstore.migrations import MIGRATIONS, Migration, apply_migrations, migrate
from forge.vectorstore.naming import table_name, validate_name
from forge.vectorstore.store import VectorStore
from forge.vectorstore.types import (
    Collection,
    Delete,
    Hit,
    InvalidWrite,
    Row,
    StoredRecord,
    Write,
    WriteResult,
)

__all__ = [
    "MIGRATIONS",
    "Collection",
    "Delete",
    "Hit",
    "InvalidWrite",
    "Migration",
    "Row",
    "StoredRecord",
    "VectorStore",
    "Write",
    "WriteResult",
    "apply_migrations",
    "migrate",
    "table_name",
    "validate_name",
]
