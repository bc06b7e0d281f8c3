"""Layer 4: who is calling. Bearer JWT or API key → `ActorContext` in the call state.

Public methods (`public: true` in their options; health and reflection) pass without
credentials and are not authenticated at all. Everything else needs exactly one credential:
`authorization: Bearer <jwt | api key>` or `x-api-key: <api key>`; API keys are recognised by
their `tp_` prefix. Failures are `UNAUTHENTICATED` with a precise reason and never echo the
credential. The revocation deny-list is consulted for every call (fail closed, bounded
staleness: server/revocation.py).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from interceptors.chain import Call, Context
from server import call_state
from server.actor import ActorContext
from server.methods import MethodSpec
from server.revocation import RevocationList
from server.tokens import (
    ApiKeyInvalid,
    CredentialsMalformed,
    CredentialsMissing,
    TokenRevoked,
    TokenVerifier,
)

API_KEY_PREFIX = "tp_"


class ApiKeyVerifier(Protocol):
    """Resolves an API key to its owner (implemented by the Auth service)."""

    async def verify(self, api_key: str) -> ActorContext:
        """The key's ActorContext; raises ApiKeyInvalid for anything not currently valid."""
        ...


class NoApiKeys:
    """Until an API-key store is plugged in, every API key is invalid (fail closed)."""

    async def verify(self, api_key: str) -> ActorContext:
        raise ApiKeyInvalid()


class AuthenticateLayer:
    """See the module docstring."""

    def __init__(
        self, tokens: TokenVerifier, api_keys: ApiKeyVerifier, revocations: RevocationList
    ) -> None:
        self._tokens = tokens
        self._api_keys = api_keys
        self._revocations = revocations

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        if method.public:
            return call
        authenticate = self.authenticate

        async def authenticated(request: Any, context: Context) -> Any:
            state = call_state.current()
            state.actor = await authenticate(state.metadata)
            return await call(request, context)

        return authenticated

    async def verify(self, credential: str) -> ActorContext:
        """Verify a credential handed over in a request body (token exchange, introspection)
        exactly as if it had come in `authorization: Bearer …`, deny-list included."""
        return await self.authenticate({"authorization": f"Bearer {credential}"})

    async def authenticate(self, metadata: dict[str, str]) -> ActorContext:
        credential = _credential(metadata)
        if credential.startswith(API_KEY_PREFIX):
            actor = await self._api_keys.verify(credential)
        else:
            actor = await self._tokens.verify(credential)
        if await self._revocations.is_revoked(actor):
            raise TokenRevoked()
        return actor


def _credential(metadata: dict[str, str]) -> str:
    header = metadata.get("authorization")
    api_key = metadata.get("x-api-key")
    if header is None and api_key is None:
        raise CredentialsMissing()
    if header is not None and api_key is not None:
        raise CredentialsMalformed("send one credential: authorization or x-api-key")
    if api_key is not None:
        return _non_empty(api_key.strip())
    scheme, _, value = header.strip().partition(" ")  # type: ignore[union-attr]
    if scheme.lower() != "bearer":
        raise CredentialsMalformed("authorization must be `Bearer <token>`")
    return _non_empty(value.strip())


_SPACE = re.compile(r"\s")  # the characters str.isspace() accepts, found in C


def _non_empty(value: str) -> str:
    if not value or _SPACE.search(value):
        raise CredentialsMalformed("credential is empty or contains spaces")
    return value
