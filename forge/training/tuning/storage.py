"""Where studies live: Optuna's RDB storage in Forge's PostgreSQL, in its own schema.

The tables sit in the schema ``optuna`` of Forge's database (``POSTGRES_URL``, or the
embedded server), beside nothing of Forge's own, so Optuna's schema migrations never
meet Forge's. ``dashboard_url`` is the URL ``optuna-dashboard`` takes to view them.

Trials send heartbeats; one silent for two heartbeat intervals is stale: the next
worker that looks at the study marks it failed, and ``RetryHeartbeatStaleTrialCallback``
queues it again with the same parameters (see ``study.py``).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from forge.settings import Settings

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

SCHEMA = "optuna"
# pg_advisory_lock(class, key) keys: Forge's class (as in vectorstore.migrations), and
# one key per purpose. Study locks use the study's id under their own class.
LOCK_CLASS = 0x466F7267
_CREATE_LOCK = 0x7475_6E65  # "tune"
STUDY_LOCK_CLASS = 0x466F7274
# A stale trial is run again at most this often; after that it stays failed.
MAX_RETRIES = 3


def sqlalchemy_url(postgres_url: str) -> str:
    """A PostgreSQL URL or conninfo string as SQLAlchemy's psycopg 3 URL, with the
    search path on the ``optuna`` schema; what ``optuna-dashboard`` takes too."""
    from sqlalchemy.engine import URL

    params = {k: str(v) for k, v in conninfo_to_dict(postgres_url).items() if v is not None}
    options = params.get("options", "")
    params["options"] = f"{options} -csearch_path={SCHEMA}".strip()
    url = URL.create("postgresql+psycopg", database=params.pop("dbname", None), query=params)
    return url.render_as_string(hide_password=False)


def dashboard_url(postgres_url: str) -> str:
    return sqlalchemy_url(postgres_url)


def open_storage(postgres_url: str, settings: Settings) -> RDBStorage:
    """The study storage, its schema and tables created on first use (one process at a
    time: concurrent ``CREATE`` statements would collide)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, _CREATE_LOCK))
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
            with warnings.catch_warnings():
                # heartbeat_interval and the stale-trial callback are marked experimental.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    sqlalchemy_url(postgres_url),
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=settings.tune_heartbeat_s,
                    grace_period=2 * settings.tune_heartbeat_s,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRIES
                    ),
                )
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, _CREATE_LOCK))
