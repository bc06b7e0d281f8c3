"""AuditService gRPC adapter: decode the request, make one AuditLog call, encode the reply."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Mapping
from typing import Any

from google.protobuf import timestamp_pb2
from trustplane.audit.v1 import audit_pb2, audit_pb2_grpc

from server import call_state, wire
from server.audit import merkle
from server.audit.model import (
    CALL,
    EVENT,
    GAP,
    EntryFilter,
    EventInput,
    Settings,
    StoredEntry,
    decode,
)
from server.audit.service import AuditLog, SubjectEntry
from server.errors import FieldViolation, InvalidArgument

_KINDS = {
    audit_pb2.ENTRY_KIND_CALL: CALL,
    audit_pb2.ENTRY_KIND_EVENT: EVENT,
    audit_pb2.ENTRY_KIND_GAP: GAP,
}
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
        async for lines in self._log.export(_tenant(), request.start_index, follow=request.follow):
            yield audit_pb2.ExportEntriesResponse(lines=lines)

    async def StreamAppendEntries(self, requests: AsyncIterator[Any], context: Any) -> Any:
        state = call_state.current()

        async def messages() -> AsyncIterator[tuple[list[EventInput], bool]]:
            async for request in requests:
                yield [_event(e) for e in request.events], request.include_checkpoint

        indexes, signed = await self._log.append_stream(
            state.require_actor(),
            messages(),
            method=state.method.path,
            request_id=state.request_id,
            peer=context.peer() or "",
        )
        response = audit_pb2.StreamAppendEntriesResponse(indexes=indexes)
        if signed is not None:
            response.checkpoint.CopyFrom(encode_checkpoint(signed))
        return response

    async def EraseSubject(self, request: Any, context: Any) -> Any:
        entries, erased_ms = await self._log.erase_subject(_tenant(), request.data_subject)
        response = audit_pb2.EraseSubjectResponse(entries=entries)
        response.erase_time.FromMilliseconds(erased_ms)
        return response

    async def ExportSubject(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for chunk in self._log.export_subject(_tenant(), request.data_subject):
            yield audit_pb2.ExportSubjectResponse(entries=[_subject_entry(e) for e in chunk])

    async def GetSettings(self, request: Any, context: Any) -> Any:
        settings = await self._log.settings(_tenant())
        return audit_pb2.GetSettingsResponse(settings=_settings(settings))

    async def UpdateSettings(self, request: Any, context: Any) -> Any:
        paths = set(request.update_mask.paths) if request.HasField("update_mask") else set()
        unknown = paths - {"retention_days"}
        if unknown or not paths:
            raise InvalidArgument.fields(
                FieldViolation("update_mask", "must name exactly: retention_days")
            )
        settings = await self._log.update_settings(
            _tenant(), request.settings.retention_days, request.settings.etag
        )
        return audit_pb2.UpdateSettingsResponse(settings=_settings(settings))


def _settings(settings: Settings) -> audit_pb2.AuditSettings:
    return audit_pb2.AuditSettings(
        retention_days=settings.retention_days, etag=wire.etag("audit", settings.revision)
    )


def _subject_entry(item: SubjectEntry) -> audit_pb2.SubjectEntry:
    out = audit_pb2.SubjectEntry(
        entry=encode_entry(item.entry, item.data_subject_ref),
        personal_data_erased=item.erased,
    )
    if item.personal_data:
        out.personal_data.update(item.personal_data)
    return out


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
        agent=request.agent,
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
        attributes=_map(event.attributes),
        occurred_at_ms=event.occurred_at.ToMilliseconds() if event.HasField("occurred_at") else 0,
        data_subject=event.data_subject,
        personal_data=_map(event.personal_data),
    )


def _map(values: Any) -> Mapping[str, str]:
    """A protobuf map field as a mapping (`dict(values)` goes through the much slower `keys()`
    of the Mapping mixin, and this runs for every appended event; empty ones share one)."""
    return {key: values[key] for key in values} if values else _EMPTY


_EMPTY: Mapping[str, str] = types.MappingProxyType({})


def encode_entry(entry: StoredEntry, data_subject_ref: str = "") -> audit_pb2.AuditEntry:
    out = audit_pb2.AuditEntry(index=entry.index, leaf_hash=entry.leaf_hash, body=entry.body or "")
    if entry.body is None:
        return out
    fields = decode(entry.body)
    personal = fields.get("personal")
    out.data_subject_ref = personal["subject"] if personal else data_subject_ref
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
