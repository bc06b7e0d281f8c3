"""Tampering with the audit log in PostgreSQL is detected: by the offline verifier (CLI and
library) on an export, and by the server, which refuses to sign over a rewritten tree."""

from __future__ import annotations

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from trustplane.audit.v1 import audit_pb2 as pb

from server.audit.verify import verify_export
from tests.support.process import ROOT, run_server, server_env
from tests.support.status import expect_error
from tests.support.tokens import TENANT, bearer

N = 12


async def _fill(running, idp):
    """N events in the tenant's log, then nothing else that could land there meanwhile."""
    member = bearer(idp.token(roles=["member"]))
    events = [pb.AuditEvent(event_type="tool.invoke", resource=f"t{i}") for i in range(N)]
    receipt = await running.audit.AppendEntries(
        pb.AppendEntriesRequest(events=events), metadata=member
    )
    await running.app.audit.flush()
    return list(receipt.indexes)


async def _export(running, idp):
    owner = bearer(idp.token(roles=["owner"]))
    head = await running.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=owner)
    lines = []
    async for chunk in running.audit.ExportEntries(pb.ExportEntriesRequest(), metadata=owner):
        lines += chunk.lines
    return lines, head.public_key_pem


async def _sql(running, statement, *args):
    async with running.app.db.acquire() as conn:
        await conn.execute(statement, *args)


async def _edit(running, idx):
    await _sql(
        running,
        "UPDATE audit_entries SET body = replace(body, '\"t', '\"X') WHERE tenant_id = $1"
        " AND idx = $2",
        TENANT,
        idx[3],
    )
    return {idx[3]}


async def _delete(running, idx):
    await _sql(
        running, "DELETE FROM audit_entries WHERE tenant_id = $1 AND idx = $2", TENANT, idx[5]
    )
    return {idx[5]}


async def _swap(running, idx):
    a, b = idx[1], idx[2]
    move = "UPDATE audit_entries SET idx = $3 WHERE tenant_id = $1 AND idx = $2"
    async with running.app.db.transaction() as conn:
        await conn.execute(move, TENANT, a, 10**9)
        await conn.execute(move, TENANT, b, a)
        await conn.execute(move, TENANT, 10**9, b)
    return {a, b}


async def _unbody(running, idx):
    """Hide what a recent entry said: remove its body as if retention had."""
    await _sql(
        running,
        "UPDATE audit_entries SET body = NULL WHERE tenant_id = $1 AND idx = $2",
        TENANT,
        idx[7],
    )
    return {idx[7]}


async def _truncate(running, idx):
    async with running.app.db.acquire() as conn:
        rows = await conn.fetch(
            "DELETE FROM audit_entries WHERE tenant_id = $1 AND idx >= $2 RETURNING idx",
            TENANT,
            idx[-2],
        )
    return {r["idx"] for r in rows}


@pytest.mark.parametrize(
    "tamper", [_edit, _delete, _swap, _unbody, _truncate], ids=lambda f: f.__name__[1:]
)
async def test_tampering_in_postgres_is_detected_with_its_index(server, idp, tmp_path, tamper):
    indexes = await _fill(server, idp)
    clean, pem = await _export(server, idp)
    key = serialization.load_pem_public_key(pem.encode())
    assert verify_export(clean, key).ok
    expected = await tamper(server, indexes)
    lines, _ = await _export(server, idp)
    report = verify_export(lines, key)
    assert not report.ok
    assert {p.index for p in report.problems} == expected, report.problems
    export = tmp_path / "export.ndjson"
    export.write_text("\n".join(lines) + "\n")
    (tmp_path / "key.pem").write_text(pem)
    (tmp_path / "clean.ndjson").write_text("\n".join(clean) + "\n")
    clean_run = _cli(tmp_path / "clean.ndjson", tmp_path / "key.pem")
    assert clean_run.returncode == 0 and "expired: 0 entries" in clean_run.stdout
    result = _cli(export, tmp_path / "key.pem")
    assert result.returncode == 1 and "FAILED" in result.stdout
    assert f"entry {min(expected)}:" in result.stdout


def _cli(export, key):
    return run_server(
        "audit", "verify", str(export), "--public-key", str(key), env=server_env(), cwd=ROOT
    )


async def test_rewritten_tree_is_never_signed(server, idp):
    await _fill(server, idp)
    owner = bearer(idp.token(roles=["owner"]))
    await server.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=owner)
    await _sql(
        server,
        "UPDATE audit_nodes SET hash = sha256(hash) WHERE tenant_id = $1 AND level > 0",
        TENANT,
    )
    await _fill(server, idp)  # the log grows: a new checkpoint would be needed
    status = await expect_error(
        server.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=owner)
    )
    assert (status.code, status.reason) == (grpc.StatusCode.DATA_LOSS, "AUDIT_LOG_INCONSISTENT")
