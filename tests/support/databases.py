"""PostgreSQL for tests: one migrated template per session, one fresh database per test."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server import migrate


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(url, "postgres"))


async def create_template(url: str) -> str:
    """Create and migrate a template database; return its name."""
    name = f"tp_tpl_{uuid.uuid4().hex[:12]}"
    conn = await admin(url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    target = await asyncpg.connect(with_database(url, name))
    try:
        await migrate.migrate(target, migrate.load())
    finally:
        await target.close()
    return name


async def create_from_template(url: str, template: str) -> str:
    name = f"tp_test_{uuid.uuid4().hex[:12]}"
    conn = await admin(url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return name


async def drop(url: str, name: str) -> None:
    conn = await admin(url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
