"""Caller identity: named tokens kept as sha256 digests, the legacy token, bearer headers, the
identity of a certificate's auth context, and files re-read when they change."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor_service.security.identity import (
    LEGACY_TOKEN_IDENTITY,
    MAX_TOKEN_CHARS,
    Tokens,
    WatchedFile,
    bearer_token,
    certificate_identity,
    load_tokens,
    parse_tokens,
)
from supervisor_service.security.policy import PolicyError


def digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def tokens_text(**named: str) -> str:
    return "[tokens]\n" + "".join(f'"{name}" = "{digest(token)}"\n' for name, token in named.items())


def test_a_token_is_its_name_and_nothing_else_is():
    tokens = parse_tokens(tokens_text(**{"ops-alice": "a-secret", "datanode-1": "dn1-secret"}), "t.toml")
    assert tokens.name_of("a-secret") == "ops-alice"
    assert tokens.name_of("dn1-secret") == "datanode-1"
    for wrong in ("", "a-secre", "a-secret ", "A-SECRET", "x" * (MAX_TOKEN_CHARS + 1), "\udcff"):
        assert tokens.name_of(wrong) is None, wrong


def test_the_legacy_auth_token_is_the_identity_token():
    tokens = parse_tokens(tokens_text(**{"ops-alice": "a"}), "t").with_legacy("old-shared")
    assert tokens.name_of("old-shared") == LEGACY_TOKEN_IDENTITY
    assert tokens.name_of("a") == "ops-alice"
    assert Tokens().with_legacy("") == Tokens()


@pytest.mark.parametrize(("text", "words"), [
    ('[tokens]\nops = "the-token-itself"\n', ["entry 'ops'", "never the token itself"]),
    ('[tokens]\nops = "sha256:ABCDEF"\n', ["entry 'ops'", "64 lower-case hex"]),
    ('[tokens]\nops = "sha256:' + "A" * 64 + '"\n', ["entry 'ops'"]),
    ('[tokens]\n"bad name" = "' + digest("x") + '"\n', ["entry 'bad name'", "not a valid identity name"]),
    ('[tokens]\nops = 1\n', ["entry 'ops'", "got a int"]),
    ('[tokens]\na = "' + digest("same") + '"\nb = "' + digest("same") + '"\n', ["entry 'b'", "same token as 'a'"]),
    ('tokens = 3\n', ["no [tokens] table"]),
    ('[tokens]\n[other]\n', ["unknown key 'other'"]),
    ('[tokens\n', ["not valid TOML"]),
])
def test_a_bad_tokens_file_is_one_line_naming_the_file_and_the_entry(tmp_path, text, words):
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_tokens(path)
    message = str(err.value)
    assert message.startswith(f"tokens file {path}: ") and "\n" not in message, message
    assert "the-token-itself" not in message  # a token pasted by mistake is not echoed into the log
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(("metadata", "expected"), [
    ((), None), (None, None), ((("authorization", "Bearer abc"),), "abc"), ((("authorization", "bearer abc"),), "abc"),
    ((("authorization", "Basic abc"),), ""), ((("authorization", "abc"),), ""), ((("authorization", "Bearer "),), ""),
    ((("x-other", "Bearer abc"),), None), ((("authorization", b"Bearer abc"),), "abc"),
])
def test_bearer_token(metadata, expected):
    assert bearer_token(metadata) == expected


def test_certificate_identity_is_the_first_dns_san_else_the_cn():
    assert certificate_identity({"peer_dns": [b"datanode-1", b"other"], "x509_common_name": [b"cn"]}) == "datanode-1"
    # An IP-only SAN list: the CN.
    assert certificate_identity({"x509_subject_alternative_name": [b"10.0.0.1"], "x509_common_name": [b"metasrv"]}) == "metasrv"
    assert certificate_identity({"transport_security_type": [b"insecure"]}) is None
    assert certificate_identity({}) is None
    assert certificate_identity({"peer_dns": [b""], "x509_common_name": [b""]}) is None


def test_a_watched_file_is_re_read_when_it_changes_and_a_bad_change_keeps_the_last_good(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_text(a="one"))
    results = []
    watched = WatchedFile(path, load_tokens, what="tokens", check_interval_s=0, on_reload=results.append)
    assert watched.current().name_of("one") == "a"
    path.write_text(tokens_text(b="two-longer"))
    assert watched.current().name_of("two-longer") == "b" and watched.current().name_of("one") is None
    path.write_text("[tokens\n")  # half written
    assert watched.current().name_of("two-longer") == "b"
    os.replace(tmp_path / "tokens.toml", tmp_path / "gone.toml")  # removed: the last good stays
    assert watched.current().name_of("two-longer") == "b"
    (tmp_path / "new.toml").write_text(tokens_text(c="three"))
    os.replace(tmp_path / "new.toml", path)  # a new inode, as a deployment's atomic rename
    assert watched.current().name_of("three") == "c"
    assert results == [True, False, False, True]


def test_a_watched_file_is_checked_at_most_once_per_interval(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_text(a="one"))
    watched = WatchedFile(path, load_tokens, what="tokens", check_interval_s=3600)
    path.write_text(tokens_text(b="two-longer"))
    assert watched.current().name_of("one") == "a"


def test_a_watched_file_that_is_bad_at_start_raises(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text('[tokens]\nops = "plain"\n')
    with pytest.raises(PolicyError, match="entry 'ops'"):
        WatchedFile(path, load_tokens, what="tokens")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.one_of(st.text(max_size=80), st.integers()), max_size=6),
       st.text(max_size=40))
def test_any_tokens_table_is_tokens_or_a_one_line_error_that_never_shows_a_value(table, token):
    text = "[tokens]\n" + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in table.items())
    try:
        tokens = parse_tokens(text, "t.toml")
    except PolicyError as exc:
        message = str(exc)
        assert message.startswith("tokens file t.toml: ") and "\n" not in message
        for value in table.values():
            named = " ".join(map(repr, table))  # names are not secret; a value that is in one is shown with it
            if isinstance(value, str) and len(value) > 8 and not value.startswith("sha256:") and value not in named:
                assert value not in message  # a token pasted in place of its digest is never echoed
        return
    assert {name for _, name in tokens.digests} == set(table)
    assert tokens.name_of(token) is None or token
