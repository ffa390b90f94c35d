"""Backups of every store Forge keeps state in (Redis, PostgreSQL, MLflow), their
verification and their restore: ``forge backup`` (see ``orchestrator``)."""
