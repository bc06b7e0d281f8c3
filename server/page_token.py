"""Opaque, tamper-evident page tokens (AIP-158).

A token is base64url(JSON position || HMAC-SHA-256). The MAC covers the position and a
fingerprint of the query (tenant, method, filters), so a token cannot be edited, forged, or
replayed against another query or tenant: any of those is INVALID_ARGUMENT / PAGE_TOKEN_INVALID.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from trustplane.common.v1 import error_reason_pb2 as reasons

from server.errors import FieldViolation, InvalidArgument

_MAC_BYTES = 16


class PageTokenInvalid(InvalidArgument):
    reason = reasons.ERROR_REASON_PAGE_TOKEN_INVALID
    default_message = "page_token is invalid; restart the listing without it"


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def encode(self, query: str, position: dict[str, Any]) -> str:
        body = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
        return base64.urlsafe_b64encode(body + self._mac(query, body)).decode().rstrip("=")

    def decode(self, query: str, token: str) -> dict[str, Any]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise PageTokenInvalid() from None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(query, body)):
            raise PageTokenInvalid()
        position: dict[str, Any] = json.loads(body)
        return position

    def _mac(self, query: str, body: bytes) -> bytes:
        message = hashlib.sha256(query.encode()).digest() + body
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]


def page_size(requested: int, default: int = 100, maximum: int = 1000) -> int:
    if requested < 0:
        raise InvalidArgument.fields(FieldViolation("page_size", "must not be negative"))
    return min(requested or default, maximum)
