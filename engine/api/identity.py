"""Who is calling: verified principals from API keys or OIDC bearer tokens.

Identity enters the engine only here. A request names no approver, requester or group of
its own: the API takes them from the verified credential, so four-eyes rules compare
verified subjects, and approver groups are the groups the credential proves.

API keys are random (256 bits), shown once at creation and stored as a scrypt hash with a
salt of their own: a copy of the key file does not give the keys away. Checking a key
costs one scrypt; a key that checked out is remembered (by a keyed digest, in memory) so
later requests cost a dictionary look-up plus a read of its row, which is where a
revocation takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt

from engine.core.errors import TerranohaError
from engine.core.policies import identity


class Role(StrEnum):
    """What a principal may do. Approving is per group: ``approve:finance``."""

    TRIGGER = "trigger"
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"


APPROVE_PREFIX = "approve:"
ALL_TENANTS = "*"

IMPLIED: Mapping[Role, frozenset[Role]] = {
    Role.TRIGGER: frozenset({Role.TRIGGER}),
    Role.READ: frozenset({Role.READ}),
    Role.OPERATE: frozenset({Role.OPERATE, Role.READ}),
    Role.ADMIN: frozenset({Role.ADMIN, Role.OPERATE, Role.READ, Role.TRIGGER}),
}
"""Roles that come with a role. Admin does not imply approving: groups are people."""


class IdentityError(TerranohaError):
    """Credentials or identity settings are wrong; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: its subject, the tenants it may see and what it may do."""

    subject: str
    tenants: frozenset[str]
    roles: frozenset[Role]
    groups: frozenset[str] = frozenset()
    via: str = "api-key"

    def may(self, role: Role) -> bool:
        return role in self.roles

    def sees(self, tenant: str) -> bool:
        return ALL_TENANTS in self.tenants or tenant in self.tenants

    @property
    def default_tenant(self) -> str | None:
        """The tenant a request means when it names none: the only one it may use."""
        if len(self.tenants) == 1 and ALL_TENANTS not in self.tenants:
            return next(iter(self.tenants))
        return None


def parse_roles(values: Iterable[str]) -> tuple[frozenset[Role], frozenset[str]]:
    """``trigger``, ``read``, ``operate``, ``admin`` and ``approve:GROUP`` into roles and
    approver groups; raises ``IdentityError`` naming a value that is none of them."""
    roles: set[Role] = set()
    groups: set[str] = set()
    for raw in values:
        value = raw.strip()
        if value.startswith(APPROVE_PREFIX):
            group = value[len(APPROVE_PREFIX) :].strip()
            if not group:
                raise IdentityError(f"role {raw!r} names no group; write approve:GROUP")
            groups.add(group)
            continue
        try:
            roles |= IMPLIED[Role(value)]
        except ValueError:
            raise IdentityError(
                f"unknown role {raw!r}; use trigger, read, operate, admin or approve:GROUP"
            ) from None
    return frozenset(roles), frozenset(groups)


# ---------------------------------------------------------------------- API keys

KEY_PREFIX = "tnh"
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
"""About 50 ms per check on this class of machine: slow for a guesser, once per key for
the server (see the module docstring)."""

KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    tenants TEXT NOT NULL,
    roles TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
"""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key, without its secret."""

    key_id: str
    subject: str
    tenants: tuple[str, ...]
    roles: tuple[str, ...]
    created_at: int
    revoked_at: int | None = None


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


class KeyStore:
    """API keys in a SQLite file of their own (``--keys``), shared by the CLI that manages
    them and the API that checks them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(KEYS_SCHEMA)
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    def close(self) -> None:
        self._db.close()

    def create(
        self, subject: str, tenants: Iterable[str], roles: Iterable[str], now_ms: int
    ) -> tuple[str, ApiKey]:
        """A new key: returns the key text (shown once, never stored) and its record."""
        who = subject.strip()
        if not who:
            raise IdentityError(
                "an API key needs a subject (--subject NAME): the identity "
                "its requests and decisions carry"
            )
        tenant_list = tuple(sorted({t.strip() for t in tenants if t.strip()}))
        if not tenant_list:
            raise IdentityError(
                "an API key needs at least one tenant (--tenant NAME, or "
                f"--tenant '{ALL_TENANTS}' for all)"
            )
        role_list = tuple(sorted({r.strip() for r in roles}))
        parse_roles(role_list)
        if not role_list:
            raise IdentityError(
                "an API key needs at least one role (--role trigger, read, "
                "operate, admin or approve:GROUP)"
            )
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    key_id,
                    who,
                    json.dumps(tenant_list),
                    json.dumps(role_list),
                    salt,
                    _hash(secret, salt),
                    now_ms,
                ),
            )
        return f"{KEY_PREFIX}_{key_id}_{secret}", ApiKey(
            key_id, who, tenant_list, role_list, now_ms
        )

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, subject, tenants, roles, created_at, revoked_at FROM api_keys "
                "ORDER BY created_at"
            ).fetchall()
        return [
            ApiKey(r[0], r[1], tuple(json.loads(r[2])), tuple(json.loads(r[3])), r[4], r[5])
            for r in rows
        ]

    def revoke(self, key_id: str, now_ms: int) -> bool:
        """Revoke the key; False if no live key has this id."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now_ms, key_id),
            )
        self._verified.pop(key_id, None)
        return cursor.rowcount == 1

    def checked(self, text: str) -> bool:
        """Whether ``text`` checked out before: verifying it again costs no scrypt (only a
        read of its row), so it may run on the event loop."""
        key_id = text.partition("_")[2].partition("_")[0]
        known = self._verified.get(key_id)
        return known is not None and hmac.compare_digest(
            known, hmac.digest(self._pepper, text.encode(), "sha256")
        )

    def verify(self, text: str) -> Principal | None:
        """The principal of a live key, or None for anything else."""
        prefix, _, rest = text.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not key_id or not secret:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT subject, tenants, roles, salt, hash FROM api_keys "
                "WHERE key_id = ? AND revoked_at IS NULL",
                (key_id,),
            ).fetchone()
        if row is None:
            return None
        digest = hmac.digest(self._pepper, text.encode(), "sha256")
        known = self._verified.get(key_id)
        if known is None or not hmac.compare_digest(known, digest):
            if not hmac.compare_digest(_hash(secret, row[3]), row[4]):
                return None
            self._verified[key_id] = digest
        roles, groups = parse_roles(json.loads(row[2]))
        return Principal(
            subject=row[0],
            tenants=frozenset(json.loads(row[1])),
            roles=roles,
            groups=groups,
            via="api-key",
        )


# ---------------------------------------------------------------------- OIDC

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
"""Asymmetric algorithms only: a token signed with a shared secret, or with none, is
refused whatever its header says."""


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """How bearer JWTs are checked and mapped to a principal."""

    issuer: str
    audience: str
    jwks: str
    """A URL (``https://...``) or the path of a JWKS file."""
    tenants_claim: str = "tenants"
    roles_claim: str = "roles"
    groups_claim: str = "groups"
    leeway_s: float = 30.0
    refresh_cooldown_s: float = 30.0
    """At most one fetch of the JWKS per this many seconds for tokens with an unknown
    kid: a flood of made-up kids does not become a flood of fetches."""
    required: tuple[str, ...] = field(default=("exp", "iss", "aud", "sub"))


class OidcVerifier:
    """Checks a JWT's signature (a key of the JWKS), issuer, audience and expiry, then
    reads tenants, roles and approver groups from its claims."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        source = settings.jwks
        self._client: jwt.PyJWKClient | None = None
        self._keys: jwt.PyJWKSet | None = None
        if source.startswith(("https://", "http://")):
            # The key set is cached for five minutes, so a key the issuer withdrew stops
            # working by then (no per-key cache that would outlive it); a token with an
            # unknown kid fetches the set again, at most once per cooldown.
            self._client = jwt.PyJWKClient(
                source,
                cache_keys=False,
                cache_jwk_set=True,
                lifespan=300,
                timeout=10,
                cooldown_duration=settings.refresh_cooldown_s,
            )
        else:
            path = Path(source)
            if not path.exists():
                raise IdentityError(
                    f"no JWKS file {source}; give --oidc-jwks a URL or the path of a JWKS file"
                )
            try:
                self._keys = jwt.PyJWKSet.from_json(path.read_text())
            except (jwt.PyJWKSetError, ValueError) as exc:
                raise IdentityError(f"JWKS file {source} is not a valid key set: {exc}") from None

    def _signing_key(self, token: str) -> Any:
        if self._client is not None:
            return self._client.get_signing_key_from_jwt(token).key
        assert self._keys is not None
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._keys.keys:
            if kid is None or key.key_id == kid:
                return key.key
        raise jwt.InvalidTokenError("no key of the JWKS has the token's kid")

    def verify(self, token: str) -> Principal | None:
        """The principal of a valid token, or None. Blocking when the JWKS is a URL (the
        first time and after a key rotation): call it off the event loop."""
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                self._signing_key(token),
                algorithms=ALGORITHMS,
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": list(s.required)},
            )
        except (jwt.PyJWTError, ValueError):
            return None
        subject = identity(str(claims.get("sub", "")))
        if not subject:
            return None
        roles, groups = parse_roles(_strings(claims.get(s.roles_claim)) & {r.value for r in Role})
        groups |= _strings(claims.get(s.groups_claim))
        return Principal(
            subject=str(claims["sub"]).strip(),
            tenants=frozenset(_strings(claims.get(s.tenants_claim))),
            roles=roles,
            groups=frozenset(groups),
            via="oidc",
        )


def _strings(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value} if value.strip() else set()
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str) and v.strip()}
    return set()


def now_ms() -> int:
    return time.time_ns() // 1_000_000
