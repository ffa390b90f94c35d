-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
-- MLflow gets its own database so its migrations never touch Forge's tables.
CREATE DATABASE mlflow OWNER forge;
