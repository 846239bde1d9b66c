"""The PostgreSQL store setting: URLs read as libpq reads them, clear errors, and a password never shown."""

from __future__ import annotations

import pytest

from supervisor_service.app.settings import ConfigError, load_settings
from supervisor_service.store import is_postgres, redact
from supervisor_service.store.postgres import PostgresSession, parse_url

SECRET = "s3cr:et-pw"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        (f"postgresql://u:{SECRET}@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss/w:x@h/db", "postgresql://u:***@h/db"),  # unescaped '@', '/' and ':'
        ("postgresql://u@h/db?sslmode=require&password=pw&x=1", "postgresql://u@h/db?sslmode=require&password=***&x=1"),
        ("postgresql://u@h/db?PASSWORD=pw", "postgresql://u@h/db?PASSWORD=***"),
        ("sqlite", "sqlite"),
        ("etcd://a:1,b:2", "etcd://a:1,b:2"),
    ],
)
def test_redact_hides_every_password(url, shown):
    assert redact(url) == shown


@pytest.mark.parametrize(
    "url, says",
    [
        (f"postgresql://u:{SECRET}@h:notaport/db", "not a number"),
        (f"postgresql://u:{SECRET}@h:70000/db", "not a number"),
        (f"postgresql://u:{SECRET}@h", "no database name"),
        ("postgresql://u:sec%zzret@h/db", "libpq"),  # a bad escape in the password itself
        (f"postgresql://u:{SECRET}@h/db?bogus=1", "bogus"),
        ("mysql://u:pw@h/db", "expected postgresql://"),
        ("postgresql://u:p@ss/w@h/db", "%40"),
    ],
)
def test_a_bad_url_is_refused_with_a_reason_and_without_its_password(url, says):
    with pytest.raises(ValueError) as info:
        parse_url(url)
    assert says in str(info.value)
    for secret in (SECRET, "sec%zzret", "p@ss", "pw@"):
        assert secret not in str(info.value)


def test_a_bad_store_setting_is_one_line_naming_it_without_the_password():
    with pytest.raises(ConfigError) as info:
        load_settings(store=f"postgresql://u:{SECRET}@h:99999/db")
    message = str(info.value)
    assert "SUPERVISOR_STORE" in message and "\n" not in message and "port" in message
    assert SECRET not in message and "s3cr" not in message


def test_good_urls_are_accepted_as_libpq_reads_them():
    assert parse_url("postgresql://u:pw@[::1]:5433/db")["host"] == "::1"
    assert parse_url("postgres://h1:5432,h2:5433/db?sslmode=verify-full")["port"] == "5432,5433"
    assert load_settings(store="postgresql://u:pw@h/db").store == "postgresql://u:pw@h/db"
    assert is_postgres("postgres://h/db") and not is_postgres("etcd://h:1")


def test_the_session_bounds_every_wait_whatever_the_url_says():
    """The URL's own timeouts cannot stretch a statement past the lease: the session's win."""
    session = PostgresSession("postgresql://u@h/db?connect_timeout=600&options=-c%20work_mem%3D64MB", name="t",
                              timeout_s=1.0)
    conninfo = session._conninfo
    assert "connect_timeout=2" in conninfo  # libpq's least
    assert "statement_timeout=1000" in conninfo and "lock_timeout=1000" in conninfo and "work_mem=64MB" in conninfo
    assert "tcp_user_timeout=1000" in conninfo and "keepalives=1" in conninfo
