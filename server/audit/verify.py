"""The offline verifier: check an NDJSON export (docs/audit-format.md) with only a public key.

`verify_export(lines, public_key)` never trusts the export: it checks the checkpoint's
signature, recomputes every leaf hash from its body, checks every inclusion proof against the
signed root, and that each body names its own log and index. An export must hold every index
from its start below the checkpoint's size exactly once; a complete one (from index 0) must
also rebuild the signed root from its leaves. Every problem is reported with the index it concerns:

* an edited entry no longer hashes to a leaf in the signed tree;
* a deleted entry leaves its index missing;
* an inserted entry repeats an index, lies beyond the checkpoint, or fails its proof;
* reordered entries arrive out of index order (and a body moved to another index names the
  wrong index);
* a body removed out of turn: retention removes the bodies of the *oldest* entries only, so the
  entries whose body is gone (null, only their leaf hash left) must come before every entry
  that still has one. A bodiless entry after a bodied one is reported as tampering: otherwise
  `UPDATE audit_entries SET body = NULL` on a recent entry would hide what it said. The
  bodiless prefix is counted in `Report.expired`.

A followed export (a tail) carries later checkpoint lines: each must be signed, of the same
log, and proven by its `consistency` proof to extend the checkpoint before it; the entries
after it are checked against it. Every index from the export's `start_index` below the last
checkpoint's size must be present.

With `trusted` (a checkpoint saved earlier), a complete export must also extend it: same log,
at least as large, and its first `trusted.size` leaves rebuild the trusted root — a log that
was truncated or rewritten since, and re-signed, fails here.

`python -m server audit verify <export> --public-key <pem> [--checkpoint <json>]` wraps it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.audit import merkle


@dataclass(frozen=True)
class Problem:
    """One finding; `index` is the entry it concerns (None: the export as a whole)."""

    index: int | None
    message: str

    def __str__(self) -> str:
        where = "export" if self.index is None else f"entry {self.index}"
        return f"{where}: {self.message}"


@dataclass
class Report:
    """The outcome of a verification."""

    checkpoint: merkle.SignedCheckpoint | None = None
    entries: int = 0
    expired: int = 0  # entries before the first one with a body: bodies removed by retention
    first_retained: int | None = None  # the index of the first entry that still has its body
    first_retained_ms: int | None = None  # ... and its time_ms: retention stopped there
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.checkpoint is not None

    def add(self, index: int | None, message: str) -> None:
        self.problems.append(Problem(index, message))


class _Malformed(ValueError):
    pass


def verify_export(
    lines: Iterable[str],
    public_key: merkle.PublicKey,
    trusted: merkle.SignedCheckpoint | None = None,
) -> Report:
    """Verify an export; see the module docstring. Never raises on bad input."""
    report = Report()
    rows = (line for line in lines if line.strip())
    header = _header(next(rows, ""), public_key, report)
    if header is None:
        return report
    signed, start, complete = header
    leaves: dict[int, bytes] = {}
    bodiless: set[int] = set()
    previous = start - 1
    for number, line in enumerate(rows, start=2):
        try:
            data = _json(line)
        except ValueError as exc:
            report.add(None, f"line {number} unreadable: {exc}")
            continue
        if data.get("type") == "checkpoint":
            signed = _next_checkpoint(data, number, signed, public_key, report)
            continue
        index = _entry(data, number, signed, leaves, bodiless, previous, report)
        previous = max(previous, index if index is not None else previous)
    report.checkpoint = signed
    report.entries = len(leaves)
    _check_retention_prefix(bodiless, report)
    _check_present(signed, start, leaves, report)
    if complete:
        _check_root(signed, leaves, report)
        if trusted is not None:
            _check_trusted(signed, trusted, public_key, leaves, report)
    return report


def _header(
    line: str, public_key: merkle.PublicKey, report: Report
) -> tuple[merkle.SignedCheckpoint, int, bool] | None:
    try:
        data = _json(line)
        if data.get("type") != "checkpoint":
            raise _Malformed("the first line is not a checkpoint")
        signed = merkle.SignedCheckpoint.from_dict(data)
        start, complete = data.get("start_index", 0), data.get("complete") is True
        if not isinstance(start, int) or start < 0:
            raise _Malformed("start_index is not a non-negative integer")
    except ValueError as exc:
        report.add(None, f"checkpoint unreadable: {exc}")
        return None
    report.checkpoint = signed
    if not merkle.verify_checkpoint(signed, public_key):
        report.add(None, "the checkpoint signature does not verify with this public key")
    return signed, start, complete and start == 0


def _next_checkpoint(
    data: dict[str, Any],
    number: int,
    current: merkle.SignedCheckpoint,
    public_key: merkle.PublicKey,
    report: Report,
) -> merkle.SignedCheckpoint:
    """A later checkpoint of a followed export: it must be signed, of the same log, and proven
    (`consistency`) to extend the current one; the entries after it are checked against it.
    Returns the checkpoint to check them against (the current one if this one is unusable)."""
    old = current.checkpoint
    try:
        signed = merkle.SignedCheckpoint.from_dict(data)
        proof = data.get("consistency")
        if not isinstance(proof, list) or not all(isinstance(p, str) for p in proof):
            raise _Malformed("consistency is not a list of base64 strings")
        hashes = [_b64(p) for p in proof]
    except ValueError as exc:
        report.add(None, f"line {number} (checkpoint) unreadable: {exc}")
        return current
    new = signed.checkpoint
    if not merkle.verify_checkpoint(signed, public_key):
        report.add(None, f"line {number}: the checkpoint signature does not verify")
    elif new.log_id != old.log_id:
        report.add(None, f"line {number}: a checkpoint of another log")
    elif data.get("start_index") != old.size:
        report.add(None, f"line {number}: start_index is not the previous checkpoint's size")
    elif not merkle.verify_consistency(old.size, new.size, old.root, new.root, hashes):
        report.add(
            None,
            f"line {number}: the log at {new.size} does not extend {old.size}"
            " (rewritten or truncated)",
        )
    else:
        return signed
    return current


def _entry(
    data: dict[str, Any],
    number: int,
    signed: merkle.SignedCheckpoint,
    leaves: dict[int, bytes],
    bodiless: set[int],
    previous: int,
    report: Report,
) -> int | None:
    try:
        index, leaf, proof, body = _parse_entry(data)
    except ValueError as exc:
        report.add(None, f"line {number} unreadable: {exc}")
        return None
    cp = signed.checkpoint
    if index in leaves:
        report.add(index, "appears more than once (inserted)")
        return index
    if index <= previous:
        report.add(index, "out of order (reordered)")
    if index >= cp.size:
        report.add(index, f"beyond the checkpoint's {cp.size} entries (inserted)")
        return index
    if body is None:
        bodiless.add(index)
    else:
        time_ms = _check_body(body, index, cp.log_id, report)
        if report.first_retained is None or index < report.first_retained:
            report.first_retained, report.first_retained_ms = index, time_ms
    if not merkle.verify_inclusion(leaf, index, cp.size, proof, cp.root):
        report.add(index, "does not verify against the signed checkpoint (edited or inserted)")
    leaves[index] = leaf
    return index


def _parse_entry(data: dict[str, Any]) -> tuple[int, bytes, list[bytes], str | None]:
    index, body, proof = data.get("index"), data.get("body"), data.get("proof")
    if data.get("type") != "entry" or not isinstance(index, int) or isinstance(index, bool):
        raise _Malformed("not an entry with an integer index")
    if body is not None and not isinstance(body, str):
        raise _Malformed("body is neither a string nor null")
    if not isinstance(proof, list) or not all(isinstance(p, str) for p in proof):
        raise _Malformed("proof is not a list of base64 strings")
    # A body removed by retention leaves only its leaf hash; otherwise the hash is recomputed.
    leaf = _b64(data.get("leaf_hash")) if body is None else merkle.leaf_hash(body.encode())
    return index, leaf, [_b64(p) for p in proof], body


def _check_body(body: str, index: int, log_id: str, report: Report) -> int | None:
    """Check what a body says about its place; returns its `time_ms` when it has one."""
    try:
        fields = json.loads(body)
    except ValueError:
        report.add(index, "body is not JSON (edited)")
        return None
    if not isinstance(fields, dict) or fields.get("index") != index:
        report.add(index, "body names another index (moved or reordered)")
        return None
    if fields.get("log") != log_id:
        report.add(index, "body names another log (moved from another tenant)")
    time_ms = fields.get("time_ms")
    return time_ms if isinstance(time_ms, int) and not isinstance(time_ms, bool) else None


def _check_retention_prefix(bodiless: set[int], report: Report) -> None:
    """Bodies removed by retention are a prefix: any other missing body was removed by hand."""
    first = report.first_retained
    for index in sorted(bodiless):
        if first is not None and index > first:
            report.add(index, "body removed out of retention order (edited)")
    report.expired = sum(1 for i in bodiless if first is None or i < first)


def _check_present(
    signed: merkle.SignedCheckpoint, start: int, leaves: dict[int, bytes], report: Report
) -> None:
    """Every index from `start` below the (last) checkpoint's size must be in the export."""
    for index in range(start, signed.checkpoint.size):
        if index not in leaves:
            report.add(index, "missing (deleted or truncated)")


def _check_root(signed: merkle.SignedCheckpoint, leaves: dict[int, bytes], report: Report) -> None:
    size = signed.checkpoint.size
    if len(leaves) < size or report.problems:
        return  # the rebuilt root would only repeat what was already found
    if merkle.root([leaves[i] for i in range(size)]) != signed.checkpoint.root:
        report.add(None, "the entries do not rebuild the signed root")


def _check_trusted(
    signed: merkle.SignedCheckpoint,
    trusted: merkle.SignedCheckpoint,
    public_key: merkle.PublicKey,
    leaves: dict[int, bytes],
    report: Report,
) -> None:
    old = trusted.checkpoint
    if not merkle.verify_checkpoint(trusted, public_key):
        report.add(None, "the trusted checkpoint's signature does not verify")
    elif old.log_id != signed.checkpoint.log_id:
        report.add(None, "the trusted checkpoint is of another log")
    elif old.size > signed.checkpoint.size:
        report.add(old.size - 1, "the log is shorter than the trusted checkpoint (truncated)")
    elif all(i in leaves for i in range(old.size)) and (
        merkle.root([leaves[i] for i in range(old.size)]) != old.root
    ):
        report.add(None, "the log is not an extension of the trusted checkpoint (rewritten)")


def _json(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise _Malformed("not JSON") from exc
    if not isinstance(data, dict):
        raise _Malformed("not a JSON object")
    return data


def _b64(value: object) -> bytes:
    if not isinstance(value, str):
        raise _Malformed("expected a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise _Malformed("invalid base64") from exc


def load_public_key(pem: bytes) -> merkle.PublicKey:
    """An Ed25519 or ECDSA P-256 public key from PEM (SubjectPublicKeyInfo)."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("the public key is neither Ed25519 nor ECDSA P-256")
    return key


def main(export: Path, public_key: Path, checkpoint: Path | None) -> int:
    """The CLI: print the findings; exit 0 when the export verifies, 1 when it does not."""
    try:
        key = load_public_key(public_key.read_bytes())
        trusted = None
        if checkpoint is not None:
            trusted = merkle.SignedCheckpoint.from_dict(json.loads(checkpoint.read_text()))
        with export.open(encoding="utf-8") as lines:
            report = verify_export(lines, key, trusted)
    except (OSError, ValueError) as exc:
        print(f"cannot verify: {exc}")
        return 2
    for problem in report.problems:
        print(problem)
    size = report.checkpoint.checkpoint.size if report.checkpoint else 0
    verdict = "OK" if report.ok else "FAILED"
    print(f"{verdict}: {report.entries} entries checked against a checkpoint of {size}")
    print(f"expired: {report.expired} entries without a body (removed by retention)", end="")
    if report.first_retained is None:
        print("; no entry has its body")
    else:
        since = report.first_retained_ms
        when = "" if since is None else f", recorded {_utc(since)}"
        print(f"; bodies kept from entry {report.first_retained}{when}")
    return 0 if report.ok else 1


def _utc(ms: int) -> str:
    try:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"
