"""The interceptor chain: order pinned, composition outermost first, options read from
descriptors."""

from __future__ import annotations

import pytest
from tptest.v1 import test_service_pb2

from interceptors.chain import Chain
from interceptors.observe import ObserveLayer
from interceptors.status import StatusLayer
from server.app import build_layers, infrastructure_methods
from server.methods import Idempotency, MethodRegistry, MethodSpecError, public_spec
from server.metrics import Metrics


def test_layer_order_is_pinned():
    layers = build_layers(Metrics())
    assert [type(layer) for layer in layers] == [ObserveLayer, StatusLayer]


class _Recording:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wrap(self, method, call):
        async def wrapped(request, context):
            self.log.append(f"{self.name}>")
            try:
                return await call(request, context)
            finally:
                self.log.append(f"<{self.name}")

        return wrapped


async def test_compose_runs_outermost_first():
    log: list[str] = []
    chain = Chain([_Recording("a", log), _Recording("b", log)], MethodRegistry())

    async def handler(request, context):
        log.append("handler")
        return request

    call = chain.compose(public_spec("s", "m"), handler)
    assert await call("x", None) == "x"  # type: ignore[arg-type]
    assert log == ["a>", "b>", "handler", "<b", "<a"]


def test_options_are_read_from_descriptors():
    registry = MethodRegistry()
    registry.add_service(test_service_pb2.DESCRIPTOR.services_by_name["TestService"])
    echo = registry["/tptest.v1.TestService/Echo"]
    assert echo.public and echo.permission == "" and echo.idempotency is Idempotency.NONE
    stream = registry["/tptest.v1.TestService/StreamEcho"]
    assert stream.server_streaming and not stream.unary


def test_registry_refuses_duplicates_and_public_with_permission():
    registry = infrastructure_methods()
    with pytest.raises(MethodSpecError, match="registered twice"):
        registry.add(public_spec("grpc.health.v1.Health", "Check"))
    spec = public_spec("x.Y", "Z")
    bad = type(spec)(**{**spec.__dict__, "permission": "x.read"})
    with pytest.raises(MethodSpecError, match="public and also declares"):
        MethodRegistry([bad])
