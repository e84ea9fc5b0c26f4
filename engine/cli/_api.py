"""``terranoha api`` (the HTTP API on uvicorn) and ``terranoha api-keys`` (create, list,
revoke the keys it accepts)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from engine.cli._backends import db_path, kafka_topics
from engine.cli._process import configure_logging
from engine.cli._shared import CliError, now_ms

KEYS_ENV = "TERRANOHA_API_KEYS"


def keys_path(args: argparse.Namespace) -> Path:
    return Path(args.keys or os.environ.get(KEYS_ENV) or "terranoha-keys.db")


def cmd_api(args: argparse.Namespace, out: TextIO) -> int:
    import uvicorn

    from engine.api import ApiContext, KeyStore, OidcSettings, OidcVerifier, create_app
    from engine.api.backends import ApiBackend, EmbeddedApiBackend, KafkaApiBackend

    configure_logging(args.log_level)
    oidc = None
    if args.oidc_issuer or args.oidc_audience or args.oidc_jwks:
        if not (args.oidc_issuer and args.oidc_audience and args.oidc_jwks):
            raise CliError("OIDC needs --oidc-issuer, --oidc-audience and --oidc-jwks together")
        oidc = OidcVerifier(
            OidcSettings(issuer=args.oidc_issuer, audience=args.oidc_audience, jwks=args.oidc_jwks)
        )
    backend: ApiBackend = (
        KafkaApiBackend(args.kafka, kafka_topics(args), app=args.app)
        if args.kafka
        else EmbeddedApiBackend(db_path(args))
    )
    from engine.api.hooks import Hooks, load_hooks

    hooks = load_hooks(args.hooks) if args.hooks else Hooks()
    keys = KeyStore(keys_path(args))
    app = create_app(ApiContext(backend, keys=keys, oidc=oidc, hooks=hooks), max_body=args.max_body)
    where = f"kafka {args.kafka}" if args.kafka else str(db_path(args))
    out.write(
        f"api on http://{args.host}:{args.port} over {where}; keys in "
        f"{keys.path}{'; OIDC ' + args.oidc_issuer if oidc else ''}\n"
    )
    out.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def cmd_api_keys_create(args: argparse.Namespace, out: TextIO) -> int:
    from engine.api import KeyStore

    store = KeyStore(keys_path(args))
    try:
        text, key = store.create(args.subject, args.tenant or (), args.role or (), now_ms())
    finally:
        store.close()
    out.write(f"{text}\n")
    out.write(
        f"key {key.key_id} for {key.subject}: tenants {', '.join(key.tenants)}; roles "
        f"{', '.join(key.roles)}. The key is shown once; keep it secret.\n"
    )
    return 0


def cmd_api_keys_list(args: argparse.Namespace, out: TextIO) -> int:
    from engine.api import KeyStore

    store = KeyStore(keys_path(args))
    try:
        for key in store.list():
            state = "revoked" if key.revoked_at else "live"
            out.write(
                f"{key.key_id}\t{key.subject}\t{','.join(key.tenants)}\t"
                f"{','.join(key.roles)}\t{state}\n"
            )
    finally:
        store.close()
    return 0


def cmd_api_keys_revoke(args: argparse.Namespace, out: TextIO) -> int:
    from engine.api import KeyStore

    store = KeyStore(keys_path(args))
    try:
        if not store.revoke(args.key_id, now_ms()):
            raise CliError(
                f"no live key {args.key_id} in {store.path}; list them with "
                "`terranoha api-keys list`"
            )
    finally:
        store.close()
    out.write(f"revoked {args.key_id}\n")
    return 0


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    backend_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """``api`` and ``api-keys create|list|revoke``."""

    def keys_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--keys",
            metavar="PATH",
            help=f"the API key file (default ${KEYS_ENV} or terranoha-keys.db)",
        )

    p = sub.add_parser(
        "api",
        help="serve the HTTP API until stopped",
        description="serve the HTTP API (OpenAPI at /openapi.json, docs at "
        "/docs); every /v1 request needs an API key or an OIDC token",
    )
    backend_options(p)
    keys_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument(
        "--max-body",
        type=int,
        default=1 << 20,
        help="largest request body in bytes; larger ones get 413 (default 1 MiB)",
    )
    p.add_argument("--oidc-issuer", help="accept bearer JWTs from this issuer (iss)")
    p.add_argument("--oidc-audience", help="... for this audience (aud)")
    p.add_argument(
        "--oidc-jwks", metavar="URL|FILE", help="... signed by a key of this JWKS (a URL or a file)"
    )
    p.add_argument(
        "--hooks",
        metavar="FILE",
        help="webhook triggers (YAML): POST /v1/hooks/NAME starts a run from a signed delivery",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("TERRANOHA_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    p.set_defaults(fn=cmd_api)

    keys = sub.add_parser("api-keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = keys_sub.add_parser("create", help="create a key and print it (once)")
    keys_option(p)
    p.add_argument(
        "--subject",
        required=True,
        help="who uses the key: the identity of its requests and decisions",
    )
    p.add_argument(
        "--tenant", action="append", help="a tenant the key may act for (repeatable; '*' for all)"
    )
    p.add_argument(
        "--role",
        action="append",
        help="trigger, read, operate, admin or approve:GROUP (repeatable)",
    )
    p.set_defaults(fn=cmd_api_keys_create)
    p = keys_sub.add_parser("list", help="list keys (never their secrets)")
    keys_option(p)
    p.set_defaults(fn=cmd_api_keys_list)
    p = keys_sub.add_parser("revoke", help="revoke a key at once")
    keys_option(p)
    p.add_argument("key_id")
    p.set_defaults(fn=cmd_api_keys_revoke)
