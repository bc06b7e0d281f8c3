"""The audit layer's resource reader: the one built per method at wrap time reads exactly what
the generic reader (`_resource`, which looks the fields up on every call) reads."""

from __future__ import annotations

import pytest
from google.protobuf import message
from trustplane.audit.v1 import audit_pb2
from trustplane.auth.v1 import auth_pb2
from trustplane.crypto.v1 import crypto_pb2
from trustplane.policy.v1 import policy_pb2
from trustplane.session.v1 import session_pb2

from interceptors.audit import _resource, _resource_fields, _resource_reader
from server.methods import spec_from_descriptor

_MODULES = (audit_pb2, auth_pb2, crypto_pb2, policy_pb2, session_pb2)
_METHODS = [
    method
    for module in _MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


def _string_fields(request_type: type[message.Message]) -> list[str]:
    return [
        f.name
        for f in request_type.DESCRIPTOR.fields
        if f.type == f.TYPE_STRING and not f.is_repeated
    ]


def _variants(request_type: type[message.Message]) -> list[message.Message]:
    """Empty; every string field set; each string field set alone."""
    names = _string_fields(request_type)
    found = [request_type(), request_type(**{n: f"{n}-value" for n in names})]
    found += [request_type(**{n: "x" * 300}) for n in names]  # longer than what is kept
    return found


@pytest.mark.parametrize("method", _METHODS, ids=lambda m: m.full_name)
def test_the_per_method_reader_reads_what_the_generic_one_does(method) -> None:
    spec = spec_from_descriptor(method)
    reader = _resource_reader(spec.request_type)
    for request in _variants(spec.request_type):
        assert reader(request) == _resource(request), request


def test_the_reader_is_built_for_the_class_the_server_parses_into() -> None:
    """The registry's request type is the generated class itself, so the fast path applies."""
    method = session_pb2.DESCRIPTOR.services_by_name["SessionService"].methods_by_name["GetSession"]
    assert spec_from_descriptor(method).request_type is session_pb2.GetSessionRequest
    read = _resource_reader(session_pb2.GetSessionRequest)
    assert read(session_pb2.GetSessionRequest(session_id="s-1")) == "s-1"
    # A message of another type (never the case for a unary call) gets the generic reader.
    assert read(crypto_pb2.GetKeyRequest(name="k")) == "k"
    assert read(b"raw") == ""


def test_only_a_single_string_name_is_the_resource() -> None:
    """A repeated `name` (no request has one today) is not taken for the resource name
    (descriptor stand-ins: no generated message has such a field)."""

    class Field:
        TYPE_STRING = 9

        def __init__(self, repeated: bool) -> None:
            self.type, self.is_repeated = 9, repeated

    class Descriptor:
        def __init__(self, repeated: bool) -> None:
            self.fields_by_name = {"name": Field(repeated), "session_id": Field(False)}

    assert _resource_fields(Descriptor(repeated=False)) == ("name",)
    assert _resource_fields(Descriptor(repeated=True)) == ("session_id",)
