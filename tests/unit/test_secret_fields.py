"""Which responses carry one-time secrets, as the contract declares with
`(trustplane.common.v1.secret)`: the idempotency layer never keeps those responses."""

from __future__ import annotations

from trustplane.auth.v1 import auth_pb2
from trustplane.crypto.v1 import crypto_pb2
from trustplane.session.v1 import session_pb2

from server.methods import Idempotency, spec_from_descriptor


def _specs():
    for module, name in (
        (auth_pb2, "AuthService"),
        (crypto_pb2, "CryptoService"),
        (session_pb2, "SessionService"),
    ):
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            yield spec_from_descriptor(method)


def test_secret_responses_are_found_at_any_depth() -> None:
    secret = {spec.name for spec in _specs() if spec.secret_response}
    # TokenPair.access_token is nested one level down in Login/Refresh.
    assert {
        "Login",
        "Refresh",
        "ExchangeToken",
        "CreateApiKey",
        "RotateApiKey",
        "CreateInvitation",
        "EnrollMfa",
        "ConfirmMfa",
        "GenerateDataKey",
    } <= secret
    assert not {"GetAgent", "ListApiKeys", "CreateKey", "Encrypt", "WhoAmI"} & secret


def test_idempotent_methods_with_secrets_are_the_known_ones() -> None:
    """Adding a secret to an idempotent method's response is a decision: review it here."""
    deduplicated = {
        spec.name
        for spec in _specs()
        if spec.secret_response and spec.idempotency is not Idempotency.NONE
    }
    assert deduplicated == {
        "CreateApiKey",
        "RotateApiKey",
        "CreateInvitation",
        "EnrollMfa",
        "ConfirmMfa",
    }
