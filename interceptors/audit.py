"""Layer 2: record every call and its outcome in the tenant's audit log.

It sits inside observe (which created the `CallState`) and outside status, so it sees the
final code and reason of every call, rejected ones included. What is recorded: method, audit
class, outcome code and reason, the caller (subject, type, delegation chain, session), the
request and idempotency ids and whether the answer was replayed, a keyed digest of the request
(HMAC-SHA-256 with a server key: it shows two calls carried the same request without storing
it, and cannot be brute-forced offline), the resource the request names, peer and latency.
Never the request body, credentials, tokens or keys.

The method's `audit` option decides when the call is answered. SECURITY: only after its entry
is durably committed ("no audit, no action"); if that fails the caller gets UNAVAILABLE /
AUDIT_UNAVAILABLE instead of the result (the action may have happened: the caller retries with
the same request id and gets the replay). ACCESS: the entry goes into a bounded in-memory queue
without waiting; only when the queue is full does the call wait for room (back-pressure).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf import message

from interceptors.chain import Call, Context
from interceptors.status import abort
from server import call_state
from server.audit.model import ACCESS, CALL, SECURITY, SYSTEM_TENANT, Record
from server.errors import TrustplaneError
from server.methods import AuditClass, MethodSpec

_log = logging.getLogger("trustplane.audit")
_MAX_RESOURCE = 256


class AuditSink(Protocol):
    """Where the layer sends entries (AuditLog)."""

    def offer(self, record: Record) -> bool: ...
    async def put(self, record: Record) -> None: ...
    async def commit(self, records: list[Record]) -> list[int]: ...


class AuditLayer:
    """Records calls; see the module docstring."""

    def __init__(
        self, sink: AuditSink, digest_key: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        self._sink = sink
        self._key = digest_key
        self._clock = clock

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        settle = self._durable if method.audit is AuditClass.SECURITY else self._queued
        record = self._record

        async def audited(request: Any, context: Context) -> Any:
            state = call_state.current()
            try:
                response = await call(request, context)
            except grpc.aio.AbortError:
                _settle_abort(state, context)
                await settle(record(state, request, context), context, failed=True)
                raise
            except asyncio.CancelledError:
                state.code = grpc.StatusCode.CANCELLED
                _offer(self._sink, record(state, request, context))
                raise
            await settle(record(state, request, context), context, failed=False)
            return response

        return audited

    async def _queued(self, entry: Record, context: Context, *, failed: bool) -> None:
        if not self._sink.offer(entry):
            await self._sink.put(entry)

    async def _durable(self, entry: Record, context: Context, *, failed: bool) -> None:
        try:
            await self._sink.commit([entry])
        except TrustplaneError as error:
            if failed:  # the call already failed; its own status stands
                return
            await abort(context, error)

    def _record(self, state: call_state.CallState, request: Any, context: Context) -> Record:
        method = state.method
        actor = state.actor
        return Record(
            tenant_id=actor.tenant_id if actor is not None else SYSTEM_TENANT,
            kind=CALL,
            time_ms=int(self._clock() * 1000),
            method=method.path,
            code=state.code.name,
            reason=state.reason,
            subject=actor.subject if actor is not None else "",
            subject_type=actor.subject_type.value if actor is not None else "",
            actors=tuple(link.subject for link in actor.act) if actor is not None else (),
            session_id=(actor.session_id or "") if actor is not None else "",
            request_id=state.request_id,
            idempotency_key=state.idempotency_key,
            replayed=state.replayed,
            request_digest=self._digest(request),
            peer=context.peer() or "",
            latency_us=int((time.perf_counter() - state.started) * 1_000_000),
            resource=_resource(request),
            attributes=state.audit_attributes,
            audit_class=SECURITY if method.audit is AuditClass.SECURITY else ACCESS,
        )

    def _digest(self, request: Any) -> str:
        if not isinstance(request, message.Message):
            return ""  # a client stream: its messages are not seen here
        return hmac.digest(self._key, request.SerializeToString(), "sha256").hex()


def _offer(sink: AuditSink, entry: Record) -> None:
    """Cancelled calls cannot wait; a full queue here is logged, never silent."""
    if not sink.offer(entry):
        _log.error("audit queue full; cancelled call not recorded", extra={"method": entry.method})


def _resource(request: Any) -> str:
    """The resource a request names: its `name` field (AIP-122) if it has one, else its first
    non-empty `…_id` string field other than `request_id` (`session_id`, `approval_id`, …)."""
    if not isinstance(request, message.Message):
        return ""
    fields = request.DESCRIPTOR.fields_by_name
    named = fields.get("name")
    if named is not None and named.type == named.TYPE_STRING:
        value: str = getattr(request, "name")  # noqa: B009 - a dynamic message field
        return value[:_MAX_RESOURCE]
    for name, field in fields.items():
        if _is_id(name, field):
            found: str = getattr(request, name)
            if found:
                return found[:_MAX_RESOURCE]
    return ""


def _is_id(name: str, field: Any) -> bool:
    return (
        name.endswith("_id")
        and name != "request_id"
        and field.type == field.TYPE_STRING
        and not field.is_repeated
    )


def _settle_abort(state: call_state.CallState, context: Context) -> None:
    """An abort that bypassed the status layer (health's NOT_FOUND) still has a code."""
    if state.code is grpc.StatusCode.OK:
        code = context.code()
        state.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
