"""Command line: `python -m server serve [--workers N]` and `python -m server migrate`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from server import logs, migrate, runner, workers
from server.audit import verify as audit_verify
from server.config import Config, ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description="trustplane server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--workers", type=int, help="processes sharing the port (needs REDIS_URL)")
    commands.add_parser("migrate", help="apply pending migrations and exit")
    boot = commands.add_parser("bootstrap", help="create the first tenant and its owner")
    boot.add_argument("--tenant", default="default", help="tenant name (default: default)")
    boot.add_argument("--email", default="admin@localhost", help="the owner's email")
    keys = commands.add_parser("keys", help="key hierarchy administration")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    rotate = key_commands.add_parser(
        "rotate-root", help="rewrap every tenant key-encryption key under the primary root key"
    )
    rotate.add_argument(
        "--generate",
        action="store_true",
        help="first add a new primary key to the root key file (the old one stays as previous)",
    )
    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="verify an NDJSON audit export offline (exit 0: it verifies)"
    )
    verify.add_argument("export", type=Path, help="the export file (ExportEntries output)")
    verify.add_argument("--public-key", type=Path, required=True, help="the signing key (PEM)")
    verify.add_argument(
        "--checkpoint", type=Path, help="a checkpoint saved earlier that the log must extend"
    )
    args = parser.parse_args(argv)
    if args.command == "audit":  # offline: needs no configuration, database or network
        return audit_verify.main(args.export, args.public_key, args.checkpoint)
    try:
        config = Config.from_environ()
        if args.command == "serve":
            config = _with_workers(config, args.workers or config.server.workers)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.observability.log_level, config.observability.log_format)
    if args.command == "migrate":
        return run_migrations(config)
    if args.command == "bootstrap":
        return runner.bootstrap_command(config, args.tenant, args.email)
    if args.command == "keys":
        return runner.rotate_root(config, generate=args.generate)
    return serve_forever(config)


def _with_workers(config: Config, workers: int) -> Config:
    if not 1 <= workers <= 64:
        raise ConfigError(f"--workers: {workers} is out of range 1-64")
    if workers > 1 and config.cache.url is None:
        raise ConfigError(
            "--workers: more than one worker needs a shared cache; set REDIS_URL "
            "(the in-process cache cannot be shared between processes)"
        )
    if workers > 1 and config.server.listen.port == 0:
        raise ConfigError("--workers: workers share one port; TRUSTPLANE_LISTEN needs a fixed port")
    return dataclasses.replace(config, server=dataclasses.replace(config.server, workers=workers))


def run_migrations(config: Config) -> int:
    """Apply pending migrations to DATABASE_URL, or to the embedded cluster."""
    try:
        with runner.database(config) as dsn:
            applied = asyncio.run(runner.migrate_database(dsn))
    except migrate.MigrationError as exc:
        print(f"migration error: {exc}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s)" if applied else "database is up to date")
    return 0


def serve_forever(config: Config) -> int:
    if config.server.workers > 1:
        return workers.supervise(config)
    return asyncio.run(runner.serve(config))


if __name__ == "__main__":
    sys.exit(main())
