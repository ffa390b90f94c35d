"""Servers and connections: the embedded redis-server and PostgreSQL that Forge runs
when ``REDIS_URL`` or ``POSTGRES_URL`` is unset, their process helpers, and ``connect``,
the one place that opens Redis connections."""
