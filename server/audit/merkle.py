"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and signed checkpoints (pure, no I/O).

Hashing (RFC 6962 §2.1, RFC 9162 §2.1.1), with SHA-256:

* a leaf hash is ``SHA-256(0x00 || data)`` (`leaf_hash`), an interior node is
  ``SHA-256(0x01 || left || right)`` (`node_hash`); the distinct prefixes keep a leaf from ever
  being passed off as an interior node (second-preimage resistance);
* the Merkle Tree Hash of n leaves splits at k, the largest power of two *smaller* than n:
  ``MTH(D[n]) = node_hash(MTH(D[0:k]), MTH(D[k:n]))``; one leaf hashes to its leaf hash, and the
  empty tree to ``SHA-256("")`` (`EMPTY_ROOT`).

Perfect-subtree storage. A *perfect subtree* at ``(level, index)`` covers the 2^level leaves
``[index * 2^level, (index + 1) * 2^level)``; level 0 holds the leaf hashes. Because the tree
always splits at a power of two, every power-of-two-sized node of *any* tree size is such a
perfect subtree, and it never changes once its last leaf is appended: an append-only log stores
each one exactly once, when it completes (`completed_nodes` names them; `MemoryTree` keeps them
in memory; a database keeps them in a table keyed by ``(level, index)``). The nodes that are not
perfect lie on the tree's ragged right edge; their hashes depend on the tree size, so they are
never stored but composed on the fly from at most ``log2(n)`` perfect subtrees (the binary
decomposition of their size). Every function here that reads the tree takes a ``node(level,
index)`` callable and only ever asks it for perfect subtrees inside the requested size.

Why proofs cost O(log n) reads. An inclusion or consistency proof has one entry per level, at
most ``ceil(log2 n)`` entries. Walking down from the root, every sibling is a perfect subtree
(one read) except at most one: the first time the walk turns left from the right edge, its
sibling is the right-edge remainder, composed from at most ``log2 n`` perfect subtrees; below
that turn the walk is inside a perfect subtree, where every node is stored. So a proof needs at
most about ``2 * log2 n`` reads of stored nodes, and a root of any size ``popcount(n)``.

Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency). Verifiers take
untrusted input and never raise: anything malformed is simply not verified (``False``). Proof
generation raises `ValueError` for out-of-range indexes and sizes. Note that a proof binds the
tree size only through the root: the same proof can verify for another size whose proof has
the same shape (e.g. leaf 0 in trees of 3 and 4 leaves), so sizes must come from a signed
`Checkpoint`, never from the proof's sender alone.

Checkpoints ("signed tree heads"), in the style of the C2SP ``tlog-checkpoint`` / signed-note
format: the signed body is UTF-8 text of exactly four newline-terminated lines::

    <log_id>\\n
    <size, decimal, no leading zeros>\\n
    <root hash, standard base64 with padding>\\n
    <timestamp, milliseconds since the Unix epoch, decimal>\\n

(C2SP's origin, tree size and root hash lines, with the timestamp as the first extension line.)
The signature covers exactly those bytes: Ed25519 (RFC 8032) over the body, or ECDSA P-256 with
SHA-256 over the body, DER-encoded (what ``cryptography``'s ``sign(body, ECDSA(SHA256()))``
returns; `signer_for` builds either). The key id is a label that picks the verification key;
it is carried next to the signature, not signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

HASH_SIZE = 32
"""Bytes in every hash here (SHA-256)."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree: SHA-256 of the empty string."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

NodeReader = Callable[[int, int], bytes]
"""``node(level, index)``: the stored hash of the perfect subtree over leaves
``[index * 2**level, (index + 1) * 2**level)``; level 0 are the leaf hashes."""

StoredNode = tuple[int, int, bytes]
"""``(level, index, hash)`` of one perfect-subtree node to persist."""

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey

_T = TypeVar("_T")


# -- hashing ------------------------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """The RFC 6962 leaf hash: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 interior-node hash: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of the given leaf hashes (`EMPTY_ROOT` for none).

    One pass, O(n) hashes: a stack of completed perfect subtrees (strictly decreasing levels)
    that is folded right to left at the end, which equals RFC 6962's recursive definition.
    """
    stack: list[tuple[int, bytes]] = []
    for leaf in leaf_hashes:
        _require_hash(leaf, "leaf hash")
        level, current = 0, leaf
        while stack and stack[-1][0] == level:
            current = node_hash(stack.pop()[1], current)
            level += 1
        stack.append((level, current))
    if not stack:
        return EMPTY_ROOT
    result = stack[-1][1]
    for _, left in reversed(stack[:-1]):
        result = node_hash(left, result)
    return result


# -- reading a tree out of perfect-subtree storage ------------------------------------------------


def root_from_nodes(size: int, node: NodeReader) -> bytes:
    """The root of the first ``size`` leaves, from at most ``popcount(size)`` stored nodes."""
    _require_size(size, "size")
    if size == 0:
        return EMPTY_ROOT
    return _range_hash(0, size, node)


def inclusion_proof(index: int, size: int, node: NodeReader) -> list[bytes]:
    """The RFC 6962 audit path for leaf ``index`` in the tree of the first ``size`` leaves.

    Ordered from the leaf's sibling up to the root's child (RFC 9162 ``inclusion_path``).
    Raises `ValueError` unless ``0 <= index < size``.
    """
    _require_size(size, "size")
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, count = 0, size
    while count > 1:
        k = _split(count)
        if index - start < k:
            path.append(_range_hash(start + k, count - k, node))
            count = k
        else:
            path.append(_range_hash(start, k, node))
            start, count = start + k, count - k
    path.reverse()
    return path


def consistency_proof(old_size: int, new_size: int, node: NodeReader) -> list[bytes]:
    """The RFC 6962 consistency proof that the first ``old_size`` leaves prefix ``new_size``.

    Empty when ``old_size`` is 0 or equals ``new_size`` (nothing to prove). Raises `ValueError`
    unless ``0 <= old_size <= new_size``.
    """
    _require_size(old_size, "old size")
    _require_size(new_size, "new size")
    if old_size > new_size:
        raise ValueError(f"old size {old_size} is larger than new size {new_size}")
    if old_size in (0, new_size):
        return []
    path: list[bytes] = []
    start, old, count = 0, old_size, new_size
    old_is_whole_subtree = True  # RFC 6962 SUBPROOF's flag b: the old tree is a node we walk to
    while old != count:
        k = _split(count)
        if old <= k:
            path.append(_range_hash(start + k, count - k, node))
            count = k
        else:
            path.append(_range_hash(start, k, node))
            start, old, count = start + k, old - k, count - k
            old_is_whole_subtree = False
    if not old_is_whole_subtree:
        path.append(_range_hash(start, old, node))  # a perfect subtree: old == count == 2^j
    path.reverse()
    return path


def completed_nodes(
    size_before: int, leaf_hashes_appended: Iterable[bytes], node: NodeReader
) -> list[StoredNode]:
    """The perfect-subtree nodes that appending these leaves to a tree of ``size_before`` completes.

    Returns ``(level, index, hash)`` for every new node, level 0 (the new leaves themselves)
    included, children before parents, so a store can insert them all in the append's
    transaction. ``node`` is asked only for already stored nodes that become the left child of a
    new one: at most one per perfect subtree of the old tree's binary decomposition.
    """
    _require_size(size_before, "size before")
    fresh: dict[tuple[int, int], bytes] = {}
    out: list[StoredNode] = []

    def read(level: int, index: int) -> bytes:
        found = fresh.get((level, index))
        return found if found is not None else node(level, index)

    for offset, leaf in enumerate(leaf_hashes_appended):
        _require_hash(leaf, "leaf hash")
        level, index, current = 0, size_before + offset, leaf
        out.append((level, index, current))
        fresh[level, index] = current
        while index & 1:  # a right child completes its parent
            current = node_hash(read(level, index - 1), current)
            level, index = level + 1, index >> 1
            out.append((level, index, current))
            fresh[level, index] = current
    return out


def _split(count: int) -> int:
    """The largest power of two strictly smaller than ``count`` (``count >= 2``)."""
    return 1 << ((count - 1).bit_length() - 1)


def _range_hash(start: int, count: int, node: NodeReader) -> bytes:
    """MTH of leaves ``[start, start + count)`` of a node of some tree, from perfect subtrees.

    Within the RFC 6962 recursion, ``start`` is a multiple of the smallest power of two not below
    ``count``, so the binary decomposition of ``count`` (largest piece first) consists of
    aligned perfect subtrees; folding them right to left gives the node's hash.
    """
    pieces: list[bytes] = []
    while count:
        level = count.bit_length() - 1
        pieces.append(node(level, start >> level))
        start, count = start + (1 << level), count - (1 << level)
    result = pieces[-1]
    for left in reversed(pieces[:-1]):
        result = node_hash(left, result)
    return result


def _require_size(size: int, what: str) -> None:
    if size < 0:
        raise ValueError(f"{what} must be >= 0, got {size}")


def _require_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes, got {len(value)}")


# -- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) ----------------------------------------------


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows leaf ``leaf_hash`` at ``index`` in the tree of ``size`` → ``root``.

    RFC 9162 §2.1.3.2; never raises, malformed input is simply not verified.
    """
    if not _all_hashes(leaf_hash, root, *proof) or not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the tree ``old_size``/``old_root`` is a prefix of the new one.

    RFC 9162 §2.1.4.2, plus the trivial cases: a tree is consistent with itself (equal sizes,
    equal roots, empty proof) and the empty tree (``old_root == EMPTY_ROOT``, empty proof) with
    every tree. Never raises; malformed input is simply not verified.
    """
    if not _all_hashes(old_root, new_root, *proof) or not 0 <= old_size <= new_size:
        return False
    if old_size in (0, new_size):
        return _nothing_to_prove(old_size, new_size, old_root, new_root, proof)
    return _verify_consistency_path(old_size, new_size, old_root, new_root, list(proof))


def _nothing_to_prove(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """The trivial cases: the empty tree before any tree, or a tree before itself."""
    if proof or (old_size == 0 and old_root != EMPTY_ROOT):
        return False
    return old_size < new_size or old_root == new_root


def _verify_consistency_path(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: list[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2 for ``0 < old_size < new_size``, step by step."""
    if not path:
        return False
    if old_size & (old_size - 1) == 0:  # the old tree is a perfect subtree of the new one
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0


def _all_hashes(*values: object) -> bool:
    return all(isinstance(v, bytes) and len(v) == HASH_SIZE for v in values)


# -- an in-memory log ---------------------------------------------------------------------------


class MemoryTree:
    """An append-only log in memory that stores every completed perfect subtree.

    The reference for a database-backed store: `append` persists exactly what `completed_nodes`
    names, and every read goes through `node`, which only knows perfect subtrees.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = []
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return len(self._levels[0]) if self._levels else 0

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash; returns its index."""
        index = self.size
        self.extend([leaf_hash])
        return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append a batch of leaf hashes, storing every perfect subtree they complete."""
        for level, index, value in completed_nodes(self.size, leaf_hashes, self.node):
            if level == len(self._levels):
                self._levels.append([])
            stored = self._levels[level]
            if index != len(stored):  # completed_nodes yields each level in order
                raise AssertionError(f"node ({level}, {index}) out of order")
            stored.append(value)

    def node(self, level: int, index: int) -> bytes:
        """The stored perfect subtree ``(level, index)``; `ValueError` if it is not complete."""
        if level < 0 or index < 0 or level >= len(self._levels):
            raise ValueError(f"no complete subtree at level {level}, index {index}")
        stored = self._levels[level]
        if index >= len(stored):
            raise ValueError(f"no complete subtree at level {level}, index {index}")
        return stored[index]

    def root(self) -> bytes:
        """The root of the whole tree."""
        return self.root_at(self.size)

    def root_at(self, size: int) -> bytes:
        """The root the tree had when it had ``size`` leaves (``0 <= size <= self.size``)."""
        self._require_within(size)
        return root_from_nodes(size, self.node)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree at ``size`` (default: now)."""
        size = self.size if size is None else size
        self._require_within(size)
        return inclusion_proof(index, size, self.node)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The consistency proof from ``old_size`` to ``new_size`` (default: now)."""
        new_size = self.size if new_size is None else new_size
        self._require_within(new_size)
        return consistency_proof(old_size, new_size, self.node)

    def _require_within(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} is not in 0..{self.size}")


# -- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: the log ``log_id`` had ``size`` leaves with root ``root`` at ``timestamp_ms``.

    Raises `ValueError` on construction if a field could not be encoded canonically.
    """

    log_id: str
    size: int
    root: bytes
    timestamp_ms: int

    def __post_init__(self) -> None:
        _require_label(self.log_id, "log id")
        _require_count(self.size, "size")
        _require_bytes(self.root, "root")
        _require_hash(self.root, "root")
        _require_count(self.timestamp_ms, "timestamp_ms")

    def body(self) -> bytes:
        """The canonical signed text (see the module docstring), UTF-8."""
        encoded_root = base64.b64encode(self.root).decode("ascii")
        return f"{self.log_id}\n{self.size}\n{encoded_root}\n{self.timestamp_ms}\n".encode()

    @classmethod
    def from_body(cls, body: bytes) -> Checkpoint:
        """Parse a body produced by `body`; `ValueError` unless it is exactly canonical."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("checkpoint body is not UTF-8") from exc
        lines = text.split("\n")
        if len(lines) != 5 or lines[4] != "":
            raise ValueError("checkpoint body must be four newline-terminated lines")
        log_id, size, encoded_root, timestamp = lines[:4]
        checkpoint = cls(
            log_id, _parse_count(size), _b64decode(encoded_root), _parse_count(timestamp)
        )
        if checkpoint.body() != body:
            raise ValueError("checkpoint body is not canonical")
        return checkpoint


@dataclass(frozen=True)
class SignedCheckpoint:
    """A `Checkpoint` with a signature over its `Checkpoint.body` by the key ``key_id``."""

    checkpoint: Checkpoint
    key_id: str
    signature: bytes

    def __post_init__(self) -> None:
        _require_label(self.key_id, "key id")
        _require_bytes(self.signature, "signature")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; bytes as standard base64."""
        return {
            "log_id": self.checkpoint.log_id,
            "size": self.checkpoint.size,
            "root": base64.b64encode(self.checkpoint.root).decode("ascii"),
            "timestamp_ms": self.checkpoint.timestamp_ms,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignedCheckpoint:
        """The inverse of `to_dict`; `ValueError` on a missing, mistyped or malformed field."""
        checkpoint = Checkpoint(
            log_id=_field(data, "log_id", str),
            size=_field(data, "size", int),
            root=_b64decode(_field(data, "root", str)),
            timestamp_ms=_field(data, "timestamp_ms", int),
        )
        return cls(
            checkpoint=checkpoint,
            key_id=_field(data, "key_id", str),
            signature=_b64decode(_field(data, "signature", str)),
        )


def sign_checkpoint(
    checkpoint: Checkpoint, sign: Callable[[bytes], bytes], key_id: str
) -> SignedCheckpoint:
    """Sign ``checkpoint.body()`` with ``sign`` (e.g. from `signer_for`), labelled ``key_id``."""
    return SignedCheckpoint(checkpoint, key_id, sign(checkpoint.body()))


def verify_checkpoint(signed: SignedCheckpoint, public_key: PublicKey) -> bool:
    """Whether ``signed.signature`` is ``public_key``'s signature over the checkpoint body.

    Ed25519, or ECDSA P-256 with SHA-256 (DER). Raises `TypeError` for another kind of key and
    `ValueError` for another curve: a wrong key is the caller's mistake, a bad signature is not.
    """
    body = signed.checkpoint.body()
    key: object = public_key  # checked at run time too: keys often come from untyped loaders
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signed.signature, body)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            _require_p256(key.curve)
            key.verify(signed.signature, body, ec.ECDSA(hashes.SHA256()))
        else:
            raise TypeError(f"unsupported public key type {type(key).__name__}")
    except InvalidSignature:
        return False
    return True


def signer_for(private_key: PrivateKey) -> Callable[[bytes], bytes]:
    """A ``sign`` callable for `sign_checkpoint` from an Ed25519 or ECDSA P-256 private key."""
    key: object = private_key  # checked at run time too: keys often come from untyped loaders
    if isinstance(key, Ed25519PrivateKey):
        return key.sign
    if isinstance(key, ec.EllipticCurvePrivateKey):
        _require_p256(key.curve)
        ec_key = key

        def sign(message: bytes) -> bytes:
            return ec_key.sign(message, ec.ECDSA(hashes.SHA256()))

        return sign
    raise TypeError(f"unsupported private key type {type(key).__name__}")


def _require_p256(curve: ec.EllipticCurve) -> None:
    if not isinstance(curve, ec.SECP256R1):
        raise ValueError(f"unsupported curve {curve.name}; only P-256 (secp256r1)")


def _require_label(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{what} must not contain control characters")


def _require_count(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0")


def _require_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes):
        raise ValueError(f"{what} must be bytes")


def _parse_count(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"not a decimal number: {text!r}")
    return int(text)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(f"not standard base64: {text!r}") from exc


def _field(data: Mapping[str, Any], name: str, kind: type[_T]) -> _T:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"checkpoint field {name!r} must be {kind.__name__}")
    return value
