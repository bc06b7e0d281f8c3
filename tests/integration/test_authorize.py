"""The authorize and rate-limit layers through the real server."""

from __future__ import annotations

import grpc
import pytest
from tptest.v1 import test_service_pb2, unguarded_pb2, unguarded_pb2_grpc

from server.app import App, ServiceRegistration
from server.methods import MethodSpecError
from tests.support.status import expect_error
from tests.support.tokens import bearer

WHO = test_service_pb2.WhoAmIRequest()


def write(name="w"):
    return test_service_pb2.WriteRequest(name=name)


async def test_viewer_reads_but_cannot_write(server, idp):
    token = idp.token(roles=["viewer"])
    assert (await server.test.WhoAmI(WHO, metadata=bearer(token))).subject == "user-1"
    status = await expect_error(server.test.Write(write(), metadata=bearer(token)))
    assert status.code is grpc.StatusCode.PERMISSION_DENIED
    assert status.reason == "PERMISSION_DENIED"
    assert status.metadata == {"permission": "tptest.write"}
    assert server.servicer.calls.get("Write") is None


@pytest.mark.parametrize(
    ("roles", "allowed"),
    [
        (["viewer"], False),
        (["member"], False),
        (["admin"], True),
        (["owner"], True),
        ([], False),
        (["superuser"], False),
    ],
)
async def test_admin_method_by_role(server, idp, roles, allowed):
    call = server.test.Administer(
        test_service_pb2.EchoRequest(message="x"), metadata=bearer(idp.token(roles=roles))
    )
    if allowed:
        assert (await call).message == "x"
    else:
        assert (await expect_error(call)).reason == "PERMISSION_DENIED"


async def test_scopes_narrow_what_roles_grant(server, idp):
    token = idp.token(roles=["owner"], scope="tptest.read")
    assert (await server.test.WhoAmI(WHO, metadata=bearer(token))).subject == "user-1"
    status = await expect_error(server.test.Write(write(), metadata=bearer(token)))
    assert status.reason == "PERMISSION_DENIED"
    assert "scopes" in status.message


async def test_streaming_method_is_authorized_too(server, idp):
    request = test_service_pb2.StreamEchoRequest(message="m", count=2)
    ok = [r.index async for r in server.test.Tail(request, metadata=bearer(idp.token()))]
    assert ok == [0, 1]

    async def denied():
        async for _ in server.test.Tail(request, metadata=bearer(idp.token(roles=[]))):
            pass

    assert (await expect_error(denied())).reason == "PERMISSION_DENIED"


async def test_method_without_permission_refuses_start(make_config):
    unguarded = ServiceRegistration(
        descriptor=unguarded_pb2.DESCRIPTOR.services_by_name["UnguardedService"],
        servicer=unguarded_pb2_grpc.UnguardedServiceServicer(),
        add_to_server=unguarded_pb2_grpc.add_UnguardedServiceServicer_to_server,
    )
    with pytest.raises(MethodSpecError, match=r"/tptest.v1.UnguardedService/Peek"):
        async with App(make_config(), extra_services=[unguarded]):
            pass


async def test_rate_limit_trips_with_retry_info(start_server, idp):
    async with start_server(TRUSTPLANE_RATE_LIMIT="60", TRUSTPLANE_RATE_BURST="3") as running:
        token = bearer(idp.token(sub="busy"))
        for _ in range(3):
            await running.test.WhoAmI(WHO, metadata=token)
        status = await expect_error(running.test.WhoAmI(WHO, metadata=token))
        assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status.reason == "RATE_LIMITED"
        assert status.retry_delay == pytest.approx(1.0, abs=0.1)  # 60/min: one per second
        assert status.quota_subjects == ["principal:11111111-1111-4111-8111-111111111111/busy/busy"]
        # Another principal, and the same user through an agent, have their own buckets.
        await running.test.WhoAmI(WHO, metadata=bearer(idp.token(sub="calm")))
        delegated = idp.token(sub="busy", act={"sub": "agent-9"})
        await running.test.WhoAmI(WHO, metadata=bearer(delegated))
        # Public methods are not limited.
        for _ in range(5):
            await running.test.Echo(test_service_pb2.EchoRequest(message="x"))
