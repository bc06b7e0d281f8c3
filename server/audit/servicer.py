"""AuditService gRPC adapter: decode the request, make one AuditLog call, encode the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2
from trustplane.audit.v1 import audit_pb2, audit_pb2_grpc

from server import call_state
from server.audit import merkle
from server.audit.model import CALL, EVENT, EntryFilter, EventInput, StoredEntry, decode
from server.audit.service import AuditLog

_KINDS = {audit_pb2.ENTRY_KIND_CALL: CALL, audit_pb2.ENTRY_KIND_EVENT: EVENT}
_KINDS_OUT = {v: k for k, v in _KINDS.items()}


def _tenant() -> str:
    return call_state.current().require_actor().tenant_id


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """One domain call per RPC; no SQL, no try."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def ListEntries(self, request: Any, context: Any) -> Any:
        entries, token = await self._log.list_entries(
            _tenant(), _filter(request), request.page_size, request.page_token
        )
        return audit_pb2.ListEntriesResponse(
            entries=[encode_entry(e) for e in entries], next_page_token=token
        )

    async def AppendEntries(self, request: Any, context: Any) -> Any:
        state = call_state.current()
        indexes, signed = await self._log.append_events(
            state.require_actor(),
            [_event(e) for e in request.events],
            method=state.method.path,
            request_id=request.request_id or state.request_id,
            peer=context.peer() or "",
            include_checkpoint=request.include_checkpoint,
        )
        response = audit_pb2.AppendEntriesResponse(indexes=indexes)
        if signed is not None:
            response.checkpoint.CopyFrom(encode_checkpoint(signed))
        return response

    async def GetCheckpoint(self, request: Any, context: Any) -> Any:
        signed = await self._log.checkpoint(_tenant())
        return audit_pb2.GetCheckpointResponse(
            checkpoint=encode_checkpoint(signed),
            public_key_pem=await self._log.public_key_pem(signed.key_id),
        )

    async def GetInclusionProof(self, request: Any, context: Any) -> Any:
        proof = await self._log.inclusion_proof(_tenant(), request.index, request.tree_size)
        response = audit_pb2.GetInclusionProofResponse(
            index=proof.index,
            tree_size=proof.tree_size,
            leaf_hash=proof.leaf_hash,
            hashes=proof.hashes,
            root_hash=proof.root,
        )
        if proof.checkpoint is not None:
            response.checkpoint.CopyFrom(encode_checkpoint(proof.checkpoint))
        return response

    async def GetConsistencyProof(self, request: Any, context: Any) -> Any:
        proof = await self._log.consistency_proof(
            _tenant(), request.first_tree_size, request.second_tree_size
        )
        response = audit_pb2.GetConsistencyProofResponse(
            first_tree_size=proof.first_size,
            second_tree_size=proof.second_size,
            hashes=proof.hashes,
            first_root_hash=proof.first_root,
            second_root_hash=proof.second_root,
        )
        if proof.checkpoint is not None:
            response.checkpoint.CopyFrom(encode_checkpoint(proof.checkpoint))
        return response

    async def ExportEntries(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for lines in self._log.export(_tenant(), request.start_index):
            yield audit_pb2.ExportEntriesResponse(lines=lines)


def _filter(request: Any) -> EntryFilter:
    return EntryFilter(
        start_ms=_millis(request, "start_time"),
        end_ms=_millis(request, "end_time"),
        subject=request.subject,
        actor=request.actor,
        session_id=request.session_id,
        method=request.method,
        code=request.code,
        resource=request.resource,
        kind=_KINDS.get(request.kind, ""),
    )


def _millis(message: Any, name: str) -> int | None:
    if not message.HasField(name):
        return None
    value: timestamp_pb2.Timestamp = getattr(message, name)
    return int(value.ToMilliseconds())


def _event(event: Any) -> EventInput:
    return EventInput(
        event_type=event.event_type,
        resource=event.resource,
        code=event.code,
        session_id=event.session_id,
        attributes=dict(event.attributes),
        occurred_at_ms=_millis(event, "occurred_at") or 0,
    )


def encode_entry(entry: StoredEntry) -> audit_pb2.AuditEntry:
    out = audit_pb2.AuditEntry(index=entry.index, leaf_hash=entry.leaf_hash, body=entry.body or "")
    if entry.body is None:
        return out
    fields = decode(entry.body)
    out.time.FromMilliseconds(fields["time_ms"])
    out.latency.FromMicroseconds(fields["latency_us"])
    out.kind = _KINDS_OUT.get(fields["kind"], audit_pb2.ENTRY_KIND_UNSPECIFIED)
    for name in _STRINGS:
        setattr(out, name, fields[name])
    out.actors.extend(fields["actors"])
    out.replayed = fields["replayed"]
    out.attributes.update(fields["attributes"])
    return out


_STRINGS = (
    "method",
    "code",
    "reason",
    "subject",
    "subject_type",
    "session_id",
    "request_id",
    "idempotency_key",
    "request_digest",
    "peer",
    "resource",
    "event_type",
    "audit_class",
)


def encode_checkpoint(signed: merkle.SignedCheckpoint) -> audit_pb2.Checkpoint:
    cp = signed.checkpoint
    out = audit_pb2.Checkpoint(
        log_id=cp.log_id,
        tree_size=cp.size,
        root_hash=cp.root,
        key_id=signed.key_id,
        signature=signed.signature,
        body=cp.body(),
    )
    out.time.FromMilliseconds(cp.timestamp_ms)
    return out
