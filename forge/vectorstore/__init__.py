"""Collections of embeddings in PostgreSQL with pgvector (see ``store.VectorStore``)."""

from forge.vectorstore.content import text_hash
from forge.vectorstore.migrations import MIGRATIONS, Migration, apply_migrations, migrate
from forge.vectorstore.naming import table_name, validate_name
from forge.vectorstore.store import VectorStore
from forge.vectorstore.types import (
    Collection,
    CollectionNotFound,
    Delete,
    Fingerprint,
    Hit,
    IndexOptions,
    InvalidWrite,
    MetadataUpdate,
    Row,
    Snapshot,
    StoredRecord,
    VersionWrites,
    Write,
    WriteResult,
)

__all__ = [
    "MIGRATIONS",
    "Collection",
    "CollectionNotFound",
    "Delete",
    "Fingerprint",
    "Hit",
    "IndexOptions",
    "InvalidWrite",
    "MetadataUpdate",
    "Migration",
    "Row",
    "Snapshot",
    "StoredRecord",
    "VectorStore",
    "VersionWrites",
    "Write",
    "WriteResult",
    "apply_migrations",
    "migrate",
    "table_name",
    "text_hash",
    "validate_name",
]
