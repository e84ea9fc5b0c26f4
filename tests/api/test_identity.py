"""Identity at the front door: OIDC tokens minted with a test key pair and checked
against a JWKS file, and API keys that are stored hashed and die when revoked."""

from __future__ import annotations

import http.server
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from engine.api import OidcSettings, OidcVerifier
from engine.api.backends import EmbeddedApiBackend
from engine.api.identity import IdentityError, KeyStore, Role, now_ms
from tests.api.conftest import PAYOUT
from tests.api.server import Api, serve_api

ISSUER = "https://idp.test"
AUDIENCE = "terranoha"


def _pair(kid: str) -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return key, {**public, "kid": kid, "use": "sig", "alg": "RS256"}


@pytest.fixture(scope="module")
def signer() -> tuple[Any, dict[str, Any]]:
    return _pair("test-1")


@pytest.fixture
def oidc_api(tmp_path: Path, signer: tuple[Any, dict[str, Any]]) -> Iterator[Api]:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [signer[1]]}))
    verifier = OidcVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks=str(jwks)))
    with serve_api(
        EmbeddedApiBackend(tmp_path / "store.db"), tmp_path / "keys.db", oidc=verifier
    ) as api:
        yield api


def _token(key: Any, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "ann",
        "iat": now,
        "exp": now + 300,
        "tenants": ["acme"],
        "roles": ["trigger", "read"],
        "groups": ["finance"],
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "test-1"})


def _get(api: Api, token: str) -> int:
    status: int = api.client(token).get("/v1/runs").status_code
    return status


def test_a_valid_token_is_a_principal_with_its_tenants_roles_and_groups(
    oidc_api: Api, signer: tuple[Any, dict[str, Any]]
) -> None:
    admin = oidc_api.client(oidc_api.key("root", ["*"], ["admin"]))
    assert admin.post("/v1/workflows", json={"spec": PAYOUT}).status_code == 201
    ann = oidc_api.client(_token(signer[0]))
    started = ann.post("/v1/runs", json={"workflow": "api-payout", "input": {"amount": 1}})
    assert started.status_code == 201, started.text
    assert started.json()["requested_by"] == "ann" and started.json()["tenant"] == "acme"
    assert ann.get("/v1/approvals").status_code == 200
    assert ann.post("/v1/workflows", json={"spec": PAYOUT}).status_code == 403


def test_tokens_that_fail_any_check_get_401(
    oidc_api: Api, signer: tuple[Any, dict[str, Any]]
) -> None:
    key = signer[0]
    now = int(time.time())
    stranger, _ = _pair("test-1")
    bad = {
        "expired": _token(key, exp=now - 120),
        "wrong audience": _token(key, aud="someone-else"),
        "wrong issuer": _token(key, iss="https://evil.test"),
        "no expiry": _token(key, exp=None),
        "no subject": _token(key, sub=None),
        "another key": _token(stranger),
        "unsigned": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "ann", "exp": now + 300}, None, algorithm="none"
        ),
        "HMAC with the public key as secret": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "ann", "exp": now + 300},
            json.dumps(signer[1]).encode() * 2,
            algorithm="HS256",
            headers={"kid": "test-1"},
        ),
    }
    for why, token in bad.items():
        assert _get(oidc_api, token) == 401, why
    assert _get(oidc_api, _token(key)) == 200


def test_token_roles_are_only_the_known_ones(
    oidc_api: Api, signer: tuple[Any, dict[str, Any]]
) -> None:
    token = _token(signer[0], roles=["approve:finance", "superuser"], groups=[])
    ann = oidc_api.client(token)
    assert ann.get("/v1/runs").status_code == 403
    assert ann.get("/v1/approvals").json() == {"approvals": []}


def test_api_keys_are_stored_hashed_and_a_revoked_key_stops_at_once(tmp_path: Path) -> None:
    with serve_api(EmbeddedApiBackend(tmp_path / "store.db"), tmp_path / "keys.db") as api:
        text, record = api.keys.create("bob", ["acme"], ["read"], now_ms())
        client = api.client(text)
        assert client.get("/v1/runs").status_code == 200
        stored = sqlite3.connect(tmp_path / "keys.db").execute("SELECT * FROM api_keys").fetchall()
        assert text.rsplit("_", 1)[1].encode() not in b"".join(
            v if isinstance(v, bytes) else str(v).encode() for row in stored for v in row
        )
        forged = text[:-2] + ("AA" if not text.endswith("AA") else "BB")
        assert api.client(forged).get("/v1/runs").status_code == 401
        assert api.keys.revoke(record.key_id, now_ms())
        assert client.get("/v1/runs").status_code == 401
        assert not api.keys.revoke(record.key_id, now_ms())


def test_a_key_needs_a_subject_a_tenant_and_known_roles(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    try:
        for subject, tenants, roles, word in [
            (" ", ["a"], ["read"], "subject"),
            ("x", [], ["read"], "tenant"),
            ("x", ["a"], ["root"], "unknown role"),
            ("x", ["a"], ["approve:"], "names no group"),
            ("x", ["a"], [], "role"),
        ]:
            with pytest.raises(IdentityError, match=word):
                store.create(subject, tenants, roles, now_ms())
        text, key = store.create("x", ["a"], ["operate"], now_ms())
        assert key.roles == ("operate",) and store.verify(text) is not None
    finally:
        store.close()


def test_operate_implies_read_and_admin_implies_all_but_approving(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    try:
        text, _ = store.create("x", ["a"], ["admin"], now_ms())
        admin = store.verify(text)
        assert admin is not None and admin.roles == frozenset(Role) and not admin.groups
        text, _ = store.create("y", ["a"], ["operate", "approve:finance"], now_ms())
        op = store.verify(text)
        assert op is not None and op.roles == {Role.OPERATE, Role.READ}
        assert op.groups == {"finance"}
    finally:
        store.close()


class _Jwks(http.server.BaseHTTPRequestHandler):
    keys: ClassVar[list[dict[str, Any]]] = []
    fetches: ClassVar[int] = 0

    def do_GET(self) -> None:
        type(self).fetches += 1
        body = json.dumps({"keys": self.keys}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_jwks_url_is_fetched_and_a_rotated_key_is_picked_up(tmp_path: Path) -> None:
    old, old_jwk = _pair("k-old")
    new, new_jwk = _pair("k-new")
    _Jwks.keys = [old_jwk]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    try:
        verifier = OidcVerifier(
            OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks=url, refresh_cooldown_s=0)
        )
        with serve_api(
            EmbeddedApiBackend(tmp_path / "store.db"), tmp_path / "keys.db", oidc=verifier
        ) as api:
            assert _get(api, _signed(old, "k-old")) == 200
            assert _get(api, _signed(new, "k-new")) == 401  # not published yet
            _Jwks.keys = [old_jwk, new_jwk]
            assert _get(api, _signed(new, "k-new")) == 200
            assert _Jwks.fetches >= 2
    finally:
        server.shutdown()
        server.server_close()


def _signed(key: Any, kid: str) -> str:
    now = int(time.time())
    return jwt.encode(
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "ann",
            "exp": now + 300,
            "tenants": ["acme"],
            "roles": ["read"],
        },
        key,
        algorithm="RS256",
        headers={"kid": kid},
    )
