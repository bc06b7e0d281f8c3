"""The test-only TestService (tests/protos): methods that exercise the chain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tptest.v1 import test_service_pb2, test_service_pb2_grpc

from server import call_state
from server.app import ServiceRegistration
from server.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

SECRET_IN_EXCEPTION = "postgresql://admin:hunter2@db/prod SELECT * FROM secrets"


class TestServicer(test_service_pb2_grpc.TestServiceServicer):
    """Behaviour driven by the request, so tests can reach every outcome."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def Echo(self, request: Any, context: Any) -> Any:
        self._count("Echo")
        return test_service_pb2.EchoResponse(message=request.message)

    async def Fail(self, request: Any, context: Any) -> Any:
        self._count("Fail")
        kind = request.kind
        if kind == "invalid_argument":
            raise InvalidArgument.fields(
                *(FieldViolation(f, f"{f} is not acceptable") for f in request.fields)
            )
        if kind == "not_found":
            raise NotFound("widget not found", metadata={"resource": "widget"})
        if kind == "exhausted":
            raise ResourceExhausted(retry_after=1.5)
        if kind == "abort":
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "aborted directly")
        raise RuntimeError(SECRET_IN_EXCEPTION)

    async def Sleep(self, request: Any, context: Any) -> Any:
        self._count("Sleep")
        await asyncio.sleep(request.millis / 1000)
        return test_service_pb2.SleepResponse(slept_millis=request.millis)

    async def StreamEcho(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._count("StreamEcho")
        for index in range(request.count):
            yield test_service_pb2.EchoResponse(message=request.message, index=index)
        if request.fail:
            raise NotFound("stream target gone")

    async def WhoAmI(self, request: Any, context: Any) -> Any:
        actor = call_state.current().require_actor()
        return test_service_pb2.WhoAmIResponse(
            tenant_id=actor.tenant_id,
            subject=actor.subject,
            subject_type=actor.subject_type.value,
            roles=sorted(actor.roles),
            scopes=sorted(actor.scopes or ()),
            scoped=actor.scopes is not None,
            act=[link.subject for link in actor.act],
            session_id=actor.session_id or "",
            token_id=actor.token_id or "",
            auth_method=actor.auth_method.value,
        )

    async def Write(self, request: Any, context: Any) -> Any:
        self._count("Write")
        key = f"write:{request.name}"
        self.calls[key] = execution = self.calls.get(key, 0) + 1
        if request.sleep_millis:
            await asyncio.sleep(request.sleep_millis / 1000)
        if request.kind == "not_found":
            raise NotFound("no such thing")
        if request.kind == "invalid_argument":
            raise InvalidArgument.fields(FieldViolation("name", "bad name"))
        if request.kind == "unavailable":
            raise Unavailable()
        if request.kind == "unexpected":
            raise RuntimeError("boom")
        return test_service_pb2.WriteResponse(name=request.name, execution=execution)

    async def Create(self, request: Any, context: Any) -> Any:
        return await self.Write(request, context)

    async def Administer(self, request: Any, context: Any) -> Any:
        return test_service_pb2.EchoResponse(message=request.message)

    async def Tail(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for index in range(request.count):
            yield test_service_pb2.EchoResponse(message=request.message, index=index)


def registration(servicer: TestServicer | None = None) -> ServiceRegistration:
    return ServiceRegistration(
        descriptor=test_service_pb2.DESCRIPTOR.services_by_name["TestService"],
        servicer=servicer or TestServicer(),
        add_to_server=test_service_pb2_grpc.add_TestServiceServicer_to_server,
    )
