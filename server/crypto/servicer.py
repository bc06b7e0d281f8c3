"""CryptoService gRPC adapter: decode the request, make one KeyManager call, encode the reply."""

from __future__ import annotations

import json
import os
from typing import Any

import grpc
from trustplane.crypto.v1 import crypto_pb2, crypto_pb2_grpc

from server import call_state, wire
from server.crypto.model import Algorithm, Key, KeyPatch, KeyVersion, Purpose, VersionState
from server.crypto.service import ItemResult, KeyManager, SealedBatch
from server.errors import FieldViolation, InvalidArgument, TrustplaneError, reason_name

_PURPOSES = {
    crypto_pb2.KEY_PURPOSE_ENCRYPT_DECRYPT: Purpose.ENCRYPT_DECRYPT,
    crypto_pb2.KEY_PURPOSE_SIGN_VERIFY: Purpose.SIGN_VERIFY,
    crypto_pb2.KEY_PURPOSE_MAC: Purpose.MAC,
}
_ALGORITHMS = {
    crypto_pb2.KEY_ALGORITHM_AES_256_GCM: Algorithm.AES_256_GCM,
    crypto_pb2.KEY_ALGORITHM_ED25519: Algorithm.ED25519,
    crypto_pb2.KEY_ALGORITHM_ECDSA_P256_SHA256: Algorithm.ECDSA_P256_SHA256,
    crypto_pb2.KEY_ALGORITHM_HMAC_SHA256: Algorithm.HMAC_SHA256,
}
_STATES = {
    VersionState.ENABLED: crypto_pb2.KEY_VERSION_STATE_ENABLED,
    VersionState.DISABLED: crypto_pb2.KEY_VERSION_STATE_DISABLED,
    VersionState.DESTROY_SCHEDULED: crypto_pb2.KEY_VERSION_STATE_DESTROY_SCHEDULED,
    VersionState.DESTROYED: crypto_pb2.KEY_VERSION_STATE_DESTROYED,
}
_PURPOSE_OUT = {v: k for k, v in _PURPOSES.items()}
_ALGORITHM_OUT = {v: k for k, v in _ALGORITHMS.items()}
_MUTABLE = {"labels", "rotation_period", "min_decryption_version"}


def _tenant() -> str:
    return call_state.current().require_actor().tenant_id


class CryptoServicer(crypto_pb2_grpc.CryptoServiceServicer):
    """One domain call per RPC; no SQL, no try."""

    def __init__(self, keys: KeyManager) -> None:
        self._keys = keys

    async def CreateKey(self, request: Any, context: Any) -> Any:
        if request.purpose not in _PURPOSES:
            raise InvalidArgument.fields(FieldViolation("purpose", "required"))
        if request.algorithm and request.algorithm not in _ALGORITHMS:
            raise InvalidArgument.fields(FieldViolation("algorithm", "unknown algorithm"))
        key = await self._keys.create_key(
            _tenant(),
            request.name,
            _PURPOSES[request.purpose],
            _ALGORITHMS.get(request.algorithm),
            wire.seconds(request, "rotation_period"),
            dict(request.labels),
            request.request_id or None,
        )
        return crypto_pb2.CreateKeyResponse(key=encode_key(key, versions=True))

    async def GetKey(self, request: Any, context: Any) -> Any:
        key = await self._keys.get_key(_tenant(), request.name)
        return crypto_pb2.GetKeyResponse(key=encode_key(key, versions=True))

    async def ListKeys(self, request: Any, context: Any) -> Any:
        keys, token = await self._keys.list_keys(_tenant(), request.page_size, request.page_token)
        return crypto_pb2.ListKeysResponse(
            keys=[encode_key(k) for k in keys], next_page_token=token
        )

    async def UpdateKey(self, request: Any, context: Any) -> Any:
        key = await self._keys.update_key(
            _tenant(), request.key.name, _patch(request), request.key.etag
        )
        return crypto_pb2.UpdateKeyResponse(key=encode_key(key, versions=True))

    async def RotateKey(self, request: Any, context: Any) -> Any:
        key = await self._keys.rotate(_tenant(), request.name)
        assert key is not None
        return crypto_pb2.RotateKeyResponse(key=encode_key(key, versions=True))

    async def DisableKeyVersion(self, request: Any, context: Any) -> Any:
        key = await self._keys.disable_version(_tenant(), request.name, request.version)
        return crypto_pb2.DisableKeyVersionResponse(key_version=_version_of(key, request.version))

    async def EnableKeyVersion(self, request: Any, context: Any) -> Any:
        key = await self._keys.enable_version(_tenant(), request.name, request.version)
        return crypto_pb2.EnableKeyVersionResponse(key_version=_version_of(key, request.version))

    async def ScheduleKeyVersionDestruction(self, request: Any, context: Any) -> Any:
        key = await self._keys.schedule_destruction(
            _tenant(), request.name, request.version, request.pending_window_days
        )
        return crypto_pb2.ScheduleKeyVersionDestructionResponse(
            key_version=_version_of(key, request.version)
        )

    async def CancelKeyVersionDestruction(self, request: Any, context: Any) -> Any:
        key = await self._keys.cancel_destruction(_tenant(), request.name, request.version)
        return crypto_pb2.CancelKeyVersionDestructionResponse(
            key_version=_version_of(key, request.version)
        )

    async def Encrypt(self, request: Any, context: Any) -> Any:
        data, version = await self._keys.encrypt(
            _tenant(), request.name, request.plaintext, request.associated_data
        )
        return crypto_pb2.EncryptResponse(ciphertext=data, key_version=version)

    async def Decrypt(self, request: Any, context: Any) -> Any:
        data, version = await self._keys.decrypt(
            _tenant(), request.name, request.ciphertext, request.associated_data
        )
        return crypto_pb2.DecryptResponse(plaintext=data, key_version=version)

    async def BatchEncrypt(self, request: Any, context: Any) -> Any:
        items = [(item.plaintext, item.associated_data) for item in request.items]
        results = await self._keys.batch_encrypt(_tenant(), request.name, items)
        if isinstance(results, SealedBatch):
            response = crypto_pb2.BatchEncryptResponse()
            add, version = response.results.add, results.key_version
            for data in results.data:
                add(data=data, key_version=version)
            return response
        return _batch(crypto_pb2.BatchEncryptResponse(), results)

    async def BatchDecrypt(self, request: Any, context: Any) -> Any:
        items = [(item.ciphertext, item.associated_data) for item in request.items]
        results = await self._keys.batch_decrypt(_tenant(), request.name, items)
        return _batch(crypto_pb2.BatchDecryptResponse(), results)

    async def ReEncrypt(self, request: Any, context: Any) -> Any:
        data, version, source = await self._keys.re_encrypt(
            _tenant(), request.name, request.ciphertext, request.associated_data
        )
        return crypto_pb2.ReEncryptResponse(
            ciphertext=data, key_version=version, source_key_version=source
        )

    async def GenerateDataKey(self, request: Any, context: Any) -> Any:
        plaintext, wrapped, version = await self._keys.generate_data_key(
            _tenant(), request.name, request.length, request.associated_data
        )
        return crypto_pb2.GenerateDataKeyResponse(
            plaintext=b"" if request.wrapped_only else plaintext,
            ciphertext=wrapped,
            key_version=version,
        )

    async def Sign(self, request: Any, context: Any) -> Any:
        signature, version, kid = await self._keys.sign(_tenant(), request.name, request.message)
        return crypto_pb2.SignResponse(signature=signature, key_version=version, kid=kid)

    async def Verify(self, request: Any, context: Any) -> Any:
        valid = await self._keys.verify(
            _tenant(), request.name, request.message, request.signature, request.key_version
        )
        return crypto_pb2.VerifyResponse(valid=valid)

    async def Mac(self, request: Any, context: Any) -> Any:
        tag, version = await self._keys.mac(_tenant(), request.name, request.data)
        return crypto_pb2.MacResponse(mac=tag, key_version=version)

    async def VerifyMac(self, request: Any, context: Any) -> Any:
        valid = await self._keys.verify_mac(
            _tenant(), request.name, request.data, request.mac, request.key_version
        )
        return crypto_pb2.VerifyMacResponse(valid=valid)

    async def GetPublicKey(self, request: Any, context: Any) -> Any:
        pem, jwk, key, version = await self._keys.public_key(
            _tenant(), request.name, request.version
        )
        return crypto_pb2.GetPublicKeyResponse(
            pem=pem,
            jwk=json.dumps(jwk),
            algorithm=_ALGORITHM_OUT[key.algorithm],
            key_version=version,
        )

    async def GenerateRandomBytes(self, request: Any, context: Any) -> Any:
        if not 1 <= request.length <= 1024:
            raise InvalidArgument.fields(FieldViolation("length", "must be 1-1024"))
        return crypto_pb2.GenerateRandomBytesResponse(data=os.urandom(request.length))


def _patch(request: Any) -> KeyPatch:
    paths = set(request.update_mask.paths)
    if not paths or not paths <= _MUTABLE:
        raise InvalidArgument.fields(
            FieldViolation("update_mask", f"must name some of: {', '.join(sorted(_MUTABLE))}")
        )
    key = request.key
    period = wire.seconds(key, "rotation_period") if "rotation_period" in paths else None
    return KeyPatch(
        labels=dict(key.labels) if "labels" in paths else None,
        rotation_period=period,
        clear_rotation="rotation_period" in paths and period is None,
        min_decryption_version=(
            key.min_decryption_version if "min_decryption_version" in paths else None
        ),
    )


def encode_version(key: Key, version: KeyVersion) -> crypto_pb2.KeyVersion:
    return crypto_pb2.KeyVersion(
        version=version.version,
        state=_STATES[version.state],
        create_time=wire.timestamp(version.created_at),
        destroy_time=wire.timestamp(version.destroy_at),
        usage={k: int(v) for k, v in version.usage.items()},
        kid=version.kid(key.key_id),
    )


def _version_of(key: Key, number: int) -> crypto_pb2.KeyVersion:
    version = key.version(number)
    assert version is not None
    return encode_version(key, version)


def encode_key(key: Key, *, versions: bool = False) -> crypto_pb2.Key:
    message = crypto_pb2.Key(
        name=key.name,
        key_id=key.key_id,
        purpose=_PURPOSE_OUT[key.purpose],
        algorithm=_ALGORITHM_OUT[key.algorithm],
        primary_version=key.primary_version,
        min_decryption_version=key.min_decryption_version,
        labels=key.labels,
        etag=key.etag,
        create_time=wire.timestamp(key.created_at),
        update_time=wire.timestamp(key.updated_at),
        next_rotation_time=wire.timestamp(key.next_rotation_at),
        versions=[encode_version(key, v) for v in key.versions] if versions else [],
    )
    if key.rotation_period is not None:
        message.rotation_period.FromNanoseconds(int(key.rotation_period * 1e9))
    return message


def _batch(response: Any, results: list[ItemResult]) -> Any:
    add = response.results.add
    for result in results:
        if result.error is None:
            add(data=result.data, key_version=result.key_version)
        else:
            add(error=_item_error(result.error))
    return response


def _item_error(error: Exception) -> crypto_pb2.ItemError:
    code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
    if isinstance(error, TrustplaneError):
        code, reason = error.code, reason_name(error.reason)
    return crypto_pb2.ItemError(code=code.value[0], reason=reason, message=str(error))
