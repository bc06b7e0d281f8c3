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

A cancelled call cannot wait for anything: its entry (code CANCELLED) is handed over with
`record_nowait`, which never loses it (with a full queue it is held aside, or — an access entry
under TRUSTPLANE_AUDIT_OVERFLOW=drop — dropped, counted and recorded as a gap like any other).

A SECURITY-class *server stream* sends data before it has a final status, so "no audit, no
action" needs an entry before the first message: the layer commits one (code OK, attribute
`stream` = `opened`) durably before the first message is written, and fails the call with
AUDIT_UNAVAILABLE instead of sending anything if it cannot; the call's usual entry, with its
final code, follows when the stream ends (attribute `stream` = `closed`). A stream that fails
before its first message has only that final entry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf import message

from interceptors.chain import Call, Context, received_bytes
from interceptors.status import abort
from server import call_state
from server.audit.model import ACCESS, CALL, SECURITY, SYSTEM_TENANT, Record
from server.errors import TrustplaneError
from server.methods import AuditClass, MethodSpec

_log = logging.getLogger("trustplane.audit")
_MAX_RESOURCE = 256
_CODE_NAMES = {code: code.name for code in grpc.StatusCode}


class AuditSink(Protocol):
    """Where the layer sends entries (AuditLog)."""

    def offer(self, record: Record) -> bool: ...
    async def put(self, record: Record) -> None: ...
    def record_nowait(self, record: Record) -> None: ...
    async def commit(self, records: list[Record]) -> list[int]: ...


class AuditLayer:
    """Records calls; see the module docstring."""

    def __init__(
        self, sink: AuditSink, digest_key: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        self._sink = sink
        # Keyed once: each digest copies this state instead of setting the key up again.
        self._keyed = hmac.new(digest_key, digestmod=hashlib.sha256)
        self._clock = clock

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        security = method.audit is AuditClass.SECURITY
        settle = self._durable if security else self._queued
        opens = security and method.server_streaming
        resource = _resource_reader(method.request_type)

        def record(state: call_state.CallState, request: Any, context: Context) -> Record:
            return self._record(state, request, context, resource)

        async def audited(request: Any, context: Context) -> Any:
            state = call_state.current()
            inner: Any = context
            if opens:
                inner = _Opening(context, self._opener(state, request, context, record))
            try:
                response = await call(request, inner)
            except grpc.aio.AbortError:
                _settle_abort(state, context)
                await settle(record(state, request, context), context, failed=True)
                raise
            except asyncio.CancelledError:
                state.code = grpc.StatusCode.CANCELLED
                self._sink.record_nowait(record(state, request, context))
                raise
            await settle(record(state, request, context), context, failed=False)
            return response

        return audited

    def _opener(
        self,
        state: call_state.CallState,
        request: Any,
        context: Context,
        record: Callable[[call_state.CallState, Any, Context], Record],
    ) -> Callable[[], Awaitable[None]]:
        """Commits a stream's `opened` entry; later entries of the call say `closed`."""

        async def opened() -> None:
            entry = record(state, request, context)
            attributes = {**entry.attributes, "stream": "opened"}
            await self._sink.commit([dataclasses.replace(entry, attributes=attributes)])
            state.audit_attributes["stream"] = "closed"

        return opened

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

    def _record(
        self,
        state: call_state.CallState,
        request: Any,
        context: Context,
        resource: Callable[[Any], str],
    ) -> Record:
        method = state.method
        actor = state.actor
        return Record(
            tenant_id=actor.tenant_id if actor is not None else SYSTEM_TENANT,
            kind=CALL,
            time_ms=int(self._clock() * 1000),
            method=method.path,
            code=_CODE_NAMES[state.code],
            reason=state.reason,
            subject=actor.subject if actor is not None else "",
            subject_type=actor.subject_type.value if actor is not None else "",
            actors=actor.actors if actor is not None else (),
            session_id=(actor.session_id or "") if actor is not None else "",
            request_id=state.request_id,
            idempotency_key=state.idempotency_key,
            replayed=state.replayed,
            request_digest=self._digest(request),
            peer=context.peer() or "",
            latency_us=int((time.perf_counter() - state.started) * 1_000_000),
            resource=resource(request),
            attributes=state.audit_attributes,
            audit_class=SECURITY if method.audit is AuditClass.SECURITY else ACCESS,
        )

    def _digest(self, request: Any) -> str:
        """Over the bytes as received (no second serialisation of a large request); a message
        the chain did not parse itself is serialised."""
        if not isinstance(request, message.Message):
            return ""  # a client stream: its messages are not seen here
        data = received_bytes(request)
        if data is None:
            data = request.SerializeToString()
        keyed = self._keyed.copy()
        keyed.update(data)
        return keyed.hexdigest()


class _Opening:
    """The call's context, except that the first `write` first runs `before` (which commits the
    stream's opening entry; if it raises, nothing is written)."""

    def __init__(self, context: Context, before: Callable[[], Awaitable[None]]) -> None:
        self._context = context
        self._before: Callable[[], Awaitable[None]] | None = before

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        before, self._before = self._before, None
        if before is not None:
            await before()
        await self._context.write(message)


def _resource(request: Any) -> str:
    """The resource a request names: its `name` field (AIP-122) if it has one, else its first
    non-empty `…_id` string field other than `request_id` (`session_id`, `approval_id`, …)."""
    if not isinstance(request, message.Message):
        return ""
    return _first_set(request, _resource_fields(request.DESCRIPTOR))


def _first_set(request: Any, names: tuple[str, ...]) -> str:
    """The first non-empty of these string fields, cut to `_MAX_RESOURCE` ("" if none)."""
    for name in names:
        found: str = getattr(request, name)
        if found:
            return found[:_MAX_RESOURCE]
    return ""


def _resource_fields(descriptor: Any) -> tuple[str, ...]:
    """The fields `_resource` reads, in order: `name` alone when it is a string field."""
    fields = descriptor.fields_by_name
    named = fields.get("name")
    if named is not None and named.type == named.TYPE_STRING and not named.is_repeated:
        return ("name",)
    return tuple(name for name, field in fields.items() if _is_id(name, field))


def _resource_reader(request_type: type[message.Message] | None) -> Callable[[Any], str]:
    """`_resource` for a method whose request type is known: its fields looked up once, at
    wrap time (a message of another type, e.g. a client stream's, still gets `_resource`)."""
    if request_type is None:
        return _resource
    names = _resource_fields(request_type.DESCRIPTOR)

    def read(request: Any) -> str:
        if type(request) is not request_type:
            return _resource(request)
        return _first_set(request, names)

    return read


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
