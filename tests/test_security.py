"""Authentication and roles for every RPC, token handling, TLS and mutual TLS, and the bind policy."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chronorec.client.client import ChronorecClient, ChronorecClientError
from chronorec.server.config import ServerConfig, config_from_args
from chronorec.server.security import (
    REQUIRED_ROLE,
    Role,
    SecurityConfigError,
    TokenTable,
    bearer_token,
    check_bind_policy,
    is_loopback,
    parse_tokens,
    required_role,
)
from chronorec.v1 import catalog_pb2, common_pb2, encoder_pb2, models_pb2, recommender_pb2
from conftest import ANCHOR
from hardening import Stubs, make_ca, make_cert, running_server, ts

TOKENS = {
    "read": "read-token-0123456789abcdef",
    "write": "write-token-0123456789abcdef",
    "admin": "admin-token-0123456789abcdef",
}
BAD_TOKEN = "wrong-token-0123456789abcdef"
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tiny_repo_template):
    root = tmp_path_factory.mktemp("secured")
    tokens_file = root / "tokens"
    tokens_file.write_text(
        "# role  token  label\n"
        f"read  {TOKENS['read']}  dashboards\n"
        f"write {TOKENS['write']} ingest\n"
    )
    tokens_file.chmod(0o600)
    # The admin token comes from the environment variable's format, to cover both sources.
    with running_server(root, tiny_repo_template, tokens_file=tokens_file, inline_tokens=f"admin {TOKENS['admin']} ops") as running:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        yield running, Stubs(channel)
        channel.close()


def _event() -> common_pb2.Event:
    return common_pb2.Event(event_id=str(uuid.uuid4()), user_id="u1", item_id="i1", action="view", timestamp=ts(ANCHOR))


def _reflect(stubs: Stubs, **kw):
    stub = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), **kw)
    return list(responses)


# Each RPC with a request that passes everything but authentication, and the status it gives then.
CALLS = {
    "Encode": (lambda s, **kw: s.encoder.Encode(encoder_pb2.EncodeRequest(texts=["hello"]), **kw), OK),
    "Recommend": (lambda s, **kw: s.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), **kw), OK),
    "Feedback": (lambda s, **kw: s.recommender.Feedback(recommender_pb2.FeedbackRequest(events=[_event()]), **kw), OK),
    "FeedbackStream": (
        lambda s, **kw: s.recommender.FeedbackStream(iter([recommender_pb2.FeedbackRequest(events=[_event()])]), **kw),
        OK,
    ),
    "GetItem": (lambda s, **kw: s.catalog.GetItem(catalog_pb2.GetItemRequest(item_id="i1"), **kw), OK),
    "UpsertItems": (
        lambda s, **kw: s.catalog.UpsertItems(
            catalog_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id=f"auth-{uuid.uuid4()}", title="jazz night")]), **kw
        ),
        OK,
    ),
    # An unknown id: the call gets past authentication and fails in the store, changing nothing.
    "DeleteItems": (
        lambda s, **kw: s.catalog.DeleteItems(catalog_pb2.DeleteItemsRequest(item_ids=["never-existed"]), **kw),
        grpc.StatusCode.NOT_FOUND,
    ),
    "GetStatus": (lambda s, **kw: s.models.GetStatus(models_pb2.GetStatusRequest(), **kw), OK),
    "ListVersions": (lambda s, **kw: s.models.ListVersions(models_pb2.ListVersionsRequest(), **kw), OK),
    "ActivateVersion": (
        lambda s, **kw: s.models.ActivateVersion(
            models_pb2.ActivateVersionRequest(version=s.models.GetStatus(models_pb2.GetStatusRequest(), metadata=_auth("admin")).serving_version, wait=False),
            **kw,
        ),
        OK,
    ),
    # One version only: nothing to roll back to.
    "Rollback": (lambda s, **kw: s.models.Rollback(models_pb2.RollbackRequest(wait=False), **kw), grpc.StatusCode.NOT_FOUND),
    "HealthCheck": (
        lambda s, **kw: health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(service=""), **kw),
        OK,
    ),
    "Reflection": (_reflect, OK),
}
ROLE_OF_CALL = {
    "Encode": Role.READ, "Recommend": Role.READ, "GetItem": Role.READ, "GetStatus": Role.READ,
    "ListVersions": Role.READ, "Reflection": Role.READ,
    "Feedback": Role.WRITE, "FeedbackStream": Role.WRITE, "UpsertItems": Role.WRITE, "DeleteItems": Role.WRITE,
    "ActivateVersion": Role.ADMIN, "Rollback": Role.ADMIN,
    "HealthCheck": None,
}
CREDENTIALS = ["none", "bad", "read", "write", "admin"]


def _auth(credential: str):
    if credential == "none":
        return ()
    token = BAD_TOKEN if credential == "bad" else TOKENS[credential]
    return (("authorization", f"Bearer {token}"),)


def _expected(call: str, credential: str) -> grpc.StatusCode:
    needed = ROLE_OF_CALL[call]
    if needed is None:
        return CALLS[call][1]
    if credential in ("none", "bad"):
        return UNAUTHENTICATED
    return CALLS[call][1] if Role[credential.upper()] >= needed else PERMISSION_DENIED


def _code(call, stubs, **kw) -> grpc.StatusCode:
    try:
        call(stubs, timeout=30, **kw)
    except grpc.RpcError as error:
        return error.code()
    return OK


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("call", list(CALLS))
def test_auth_matrix(secured, call, credential):
    _, stubs = secured
    assert _code(CALLS[call][0], stubs, metadata=_auth(credential)) == _expected(call, credential)


def test_every_registered_method_has_a_documented_role():
    from chronorec.v1 import catalog_pb2 as c, encoder_pb2 as e, models_pb2 as m, recommender_pb2 as r

    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (c, e, m, r)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods <= set(REQUIRED_ROLE)
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.health.v1.Health/Watch") is None
    # A method added later without a role needs admin until someone decides otherwise.
    assert required_role("/chronorec.v1.ModelService/DropEverything") == Role.ADMIN


def test_malformed_authorization_headers_are_unauthenticated(secured):
    _, stubs = secured
    call = CALLS["GetStatus"][0]
    for metadata in [
        (("authorization", f"Basic {TOKENS['admin']}"),),
        (("authorization", TOKENS["admin"]),),
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {TOKENS['read'].upper()}"),),
        (("authorization", f"Bearer {TOKENS['read']}x"),),
        (("authorization", f"Bearer {TOKENS['read'][:-1]}"),),
        # Two headers are ambiguous: refused even when one of them is valid.
        (("authorization", f"Bearer {TOKENS['read']}"), ("authorization", f"Bearer {BAD_TOKEN}")),
    ]:
        assert _code(call, stubs, metadata=metadata) == UNAUTHENTICATED, metadata
    # The scheme is case-insensitive (RFC 7235).
    assert _code(call, stubs, metadata=(("authorization", f"bearer {TOKENS['read']}"),)) == OK


def test_error_messages_name_the_needed_role(secured):
    _, stubs = secured
    with pytest.raises(grpc.RpcError) as info:
        stubs.models.Rollback(models_pb2.RollbackRequest(), metadata=_auth("write"), timeout=10)
    assert info.value.code() == PERMISSION_DENIED and "admin" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stubs.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)
    assert info.value.code() == UNAUTHENTICATED and "Bearer" in info.value.details()


def test_tokens_are_never_logged(secured, caplog):
    running, stubs = secured
    with caplog.at_level(logging.DEBUG):
        for credential in CREDENTIALS:
            for name in ("GetStatus", "Rollback", "Feedback"):
                _code(CALLS[name][0], stubs, metadata=_auth(credential))
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "may not call" in text  # the denials were logged ...
    for token in list(TOKENS.values()) + [BAD_TOKEN]:
        assert token not in text  # ... without a token
    config = ServerConfig(inline_tokens=f"admin {TOKENS['admin']}")
    assert TOKENS["admin"] not in repr(config) and TOKENS["admin"] not in str(config.redacted())


def test_client_library_sends_the_token(secured):
    running, _ = secured
    target = f"127.0.0.1:{running.port}"
    with ChronorecClient(target, token=TOKENS["read"], max_retries=0) as client:
        assert len(client.encode(["hello"]).vectors) == 1
        with pytest.raises(ChronorecClientError) as info:
            client.feedback([{"user_id": "u1", "item_id": "i1", "action": "view"}])
        assert info.value.code == PERMISSION_DENIED
    with ChronorecClient(target, max_retries=0) as anonymous, pytest.raises(ChronorecClientError) as info:
        anonymous.status()
    assert info.value.code == UNAUTHENTICATED


# ---------------------------------------------------------------- token parsing


def test_token_file_format_and_errors(tmp_path):
    entries = parse_tokens(
        "# comment\n\nread  abcdefghijklmnop  dash\nadmin ABCDEFGHIJKLMNOP.-_~+/==   # trailing comment\n", "tokens"
    )
    assert [(p.label, p.role) for _, p in entries] == [("dash", Role.READ), ("tokens:4", Role.ADMIN)]
    assert all(len(digest) == 32 for digest, _ in entries)  # only digests are kept
    for bad, why in [
        ("reader abcdefghijklmnop", "role"),
        ("read short", "shorter"),
        ("read abcdefghijklmnop label extra", "ROLE TOKEN"),
        ("read abcdefghijklmnop\u00e9", "characters"),
        ("read abcdefghijklmnop bad/label", "label"),
    ]:
        with pytest.raises(SecurityConfigError) as info:
            parse_tokens(bad, "tokens")
        assert why in str(info.value)
        assert "abcdefghijklmnop" not in str(info.value)
    table = TokenTable(inline="read abcdefghijklmnop ; write qrstuvwxyz0123456 ci")
    assert table.lookup("qrstuvwxyz0123456").role == Role.WRITE
    assert table.lookup("abcdefghijklmnop").label == "CHRONOREC_TOKENS:1"
    assert table.lookup("abcdefghijklmnoq") is None and table.lookup("") is None
    with pytest.raises(SecurityConfigError, match="twice"):
        TokenTable(inline="read abcdefghijklmnop; admin abcdefghijklmnop")
    with pytest.raises(SecurityConfigError, match="cannot be read"):
        TokenTable(tmp_path / "missing")


def test_tokens_file_is_reloaded_when_it_changes(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("read abcdefghijklmnop\n")
    path.chmod(0o600)
    table = TokenTable(path, reload_interval_s=0.0)
    assert table.lookup("abcdefghijklmnop").role == Role.READ
    path.write_text("admin qrstuvwxyz0123456\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert table.lookup("abcdefghijklmnop") is None
    assert table.lookup("qrstuvwxyz0123456").role == Role.ADMIN
    # A broken edit keeps the tokens that worked.
    path.write_text("admin short\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with caplog.at_level(logging.ERROR):
        assert table.lookup("qrstuvwxyz0123456").role == Role.ADMIN
    assert "not reloaded" in caplog.text


def test_tokens_file_that_is_not_utf8_is_named(tmp_path, tiny_repo_template, caplog):
    from chronorec.server.app import serve

    path = tmp_path / "tokens.txt"
    path.write_bytes(b"read abcdefghijklmnop\nwrite \xff\xfeqrstuvwxyz0123456\n")
    path.chmod(0o600)
    with pytest.raises(SecurityConfigError) as info:
        TokenTable(path)
    assert str(path) in str(info.value) and "not UTF-8" in str(info.value)
    assert "abcdefghijklmnop" not in str(info.value)
    config = ServerConfig(port=0, data_dir=tmp_path / "data", models_root=tiny_repo_template, demo=False, tokens_file=path)
    with pytest.raises(SecurityConfigError, match="not UTF-8"):
        serve(config)
    # A file that stops being UTF-8 while serving: the previous tokens stay, the log names the file.
    path.write_text("read abcdefghijklmnop\n")
    table = TokenTable(path, reload_interval_s=0.0)
    path.write_bytes(b"read abcdefghijklmnop\nadmin \xffqrstuvwxyz0123456\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with caplog.at_level(logging.ERROR):
        assert table.lookup("abcdefghijklmnop").role == Role.READ
    assert "not reloaded" in caplog.text and "not UTF-8" in caplog.text and str(path) in caplog.text


def test_bearer_token_parsing():
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "BEARER  abc "),)) == "abc"
    assert bearer_token((("x-other", "Bearer abc"),)) is None
    assert bearer_token(None) is None


def test_config_reads_tokens_from_the_environment_only(monkeypatch):
    monkeypatch.setenv("CHRONOREC_TOKENS", f"read {TOKENS['read']}")
    config = config_from_args(["--port", "0", "--max-k", "50"])
    assert config.inline_tokens == f"read {TOKENS['read']}" and config.limits.max_k == 50
    assert config.redacted()["inline_tokens"] == "<redacted>"
    with pytest.raises(ValueError, match="max_k"):
        config_from_args(["--max-k", "0"])


# ---------------------------------------------------------------- bind policy


def test_loopback_detection():
    for host in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]:
        assert is_loopback(host), host
    for host in ["0.0.0.0", "::", "[::]", "10.0.0.5", "example.internal", ""]:
        assert not is_loopback(host), host


def test_public_bind_needs_authentication_or_an_explicit_flag(tmp_path, tiny_repo_template, caplog):
    from chronorec.server.app import serve

    config = ServerConfig(host="0.0.0.0", port=0, data_dir=tmp_path, models_root=tiny_repo_template, demo=False)
    with pytest.raises(SecurityConfigError, match="--allow-insecure-public"):
        serve(config)
    assert not (tmp_path / "chronorec.db").exists()  # refused before anything was opened
    check_bind_policy("0.0.0.0", authenticated=True, allow_insecure_public=False)
    with caplog.at_level(logging.WARNING):
        check_bind_policy("0.0.0.0", authenticated=False, allow_insecure_public=True)
        check_bind_policy("127.0.0.1", authenticated=False, allow_insecure_public=False)
    assert "WITHOUT AUTHENTICATION" in caplog.text and "UNAUTHENTICATED on loopback" in caplog.text


def test_loopback_server_without_tokens_says_so(start_server, tiny_repo, caplog):
    with caplog.at_level(logging.WARNING, logger="chronorec.security"):
        server = start_server(tiny_repo)
    assert "UNAUTHENTICATED on loopback" in caplog.text
    server.models.GetStatus(models_pb2.GetStatusRequest(), timeout=10)


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    rogue = make_ca(folder, "rogue-ca")
    return {
        "ca": ca,
        "rogue": rogue,
        "server": make_cert(folder, "server", ca, server=True),
        "client": make_cert(folder, "client", ca, server=False),
        "rogue_client": make_cert(folder, "rogue-client", rogue, server=False),
        "rogue_server": make_cert(folder, "rogue-server", rogue, server=True),
    }


def _status_code(target: str, **client_args) -> grpc.StatusCode:
    try:
        with ChronorecClient(target, timeout=5, max_retries=0, **client_args) as client:
            client.status()
    except ChronorecClientError as error:
        return error.code
    return OK


def test_tls_handshake(start_server, tiny_repo, pki):
    cert, key = pki["server"]
    server = start_server(tiny_repo, tls_cert=cert, tls_key=key)
    assert _status_code(server.target, tls_ca=pki["ca"][0]) == OK
    assert _status_code(server.target, tls_ca=pki["rogue"][0]) == grpc.StatusCode.UNAVAILABLE
    plaintext = grpc.insecure_channel(server.target)
    with pytest.raises(grpc.RpcError) as info:
        Stubs(plaintext).models.GetStatus(models_pb2.GetStatusRequest(), timeout=5)
    plaintext.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_handshake_and_tokens_on_top(start_server, tiny_repo, pki):
    cert, key = pki["server"]
    server = start_server(
        tiny_repo, tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"][0], inline_tokens=f"read {TOKENS['read']}"
    )
    ca = pki["ca"][0]
    client_cert, client_key = pki["client"]
    assert _status_code(server.target, tls_ca=ca, tls_cert=client_cert, tls_key=client_key, token=TOKENS["read"]) == OK
    # The certificate admits the connection; the token still decides what the caller may do.
    assert _status_code(server.target, tls_ca=ca, tls_cert=client_cert, tls_key=client_key) == UNAUTHENTICATED
    assert _status_code(server.target, tls_ca=ca, token=TOKENS["read"]) == grpc.StatusCode.UNAVAILABLE
    rogue_cert, rogue_key = pki["rogue_client"]
    assert _status_code(server.target, tls_ca=ca, tls_cert=rogue_cert, tls_key=rogue_key, token=TOKENS["read"]) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_without_tokens_may_bind_publicly(start_server, tiny_repo, pki):
    cert, key = pki["server"]
    server = start_server(tiny_repo, host="0.0.0.0", tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"][0], wait=True)
    target = f"127.0.0.1:{server.port}"
    client_cert, client_key = pki["client"]
    assert _status_code(target, tls_ca=pki["ca"][0], tls_cert=client_cert, tls_key=client_key) == OK
    assert _status_code(target, tls_ca=pki["ca"][0]) == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked_at_start(tmp_path, tiny_repo_template, pki):
    from chronorec.server.app import serve

    base = ServerConfig(port=0, data_dir=tmp_path, models_root=tiny_repo_template, demo=False)
    cert, key = pki["server"]
    for overrides, message in [
        ({"tls_cert": cert}, "both"),
        ({"tls_client_ca": pki["ca"][0]}, "needs --tls-cert"),
        ({"tls_cert": cert, "tls_key": tmp_path / "missing.key"}, "cannot be read"),
        ({"tokens_file": tmp_path / "no-tokens"}, "cannot be read"),
        ({"tls_cert": key, "tls_key": key}, "not PEM"),
        ({"tls_cert": cert, "tls_key": cert}, "not PEM"),
    ]:
        with pytest.raises(SecurityConfigError, match=message):
            serve(ServerConfig(**{**base.__dict__, **overrides}))
    # A key that does not belong to the certificate: refused at bind, with a hint.
    other_key = pki["client"][1]
    with pytest.raises(RuntimeError, match="does not match"):
        serve(ServerConfig(**{**base.__dict__, "tls_cert": cert, "tls_key": other_key}))
