"""Root keys follow their key file while the server runs (no restart, no message)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from server.crypto.hierarchy import RootKeys, RootKeyUnavailable, kek_context, root_key_id


def _key() -> tuple[bytes, str]:
    raw = os.urandom(32)
    return raw, base64.b64encode(raw).decode()


def _write(path: Path, *lines: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in lines))
    os.replace(temporary, path)  # as `keys rotate-root --generate` does


def test_a_changed_file_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    (old, old_text), (new, new_text) = _key(), _key()
    _write(path, old_text)
    roots = RootKeys.from_config(None, path, tmp_path)
    old_id, wrapped = roots.wrap(b"k" * 32, kek_context("t"))
    assert old_id == root_key_id(old)
    _write(path, new_text, old_text)  # a new primary, the old key kept to unwrap
    new_id, _ = roots.wrap(b"k" * 32, kek_context("t"))
    assert new_id == root_key_id(new)
    assert roots.unwrap(old_id, wrapped, kek_context("t")) == b"k" * 32
    _write(path, new_text)  # the old key removed: forgotten as well
    with pytest.raises(RootKeyUnavailable):
        roots.unwrap(old_id, wrapped, kek_context("t"))


def test_an_unreadable_file_keeps_the_loaded_keys(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    raw, text = _key()
    _write(path, text)
    roots = RootKeys.from_config(None, path, tmp_path)
    _write(path, "not base64!")
    root_id, wrapped = roots.wrap(b"m", kek_context("t"))
    assert root_id == root_key_id(raw)
    path.unlink()
    assert roots.unwrap(root_id, wrapped, kek_context("t")) == b"m"


def test_workers_starting_together_share_one_generated_key(tmp_path: Path) -> None:
    """`serve --workers N` on a fresh data directory: every worker may find no key file and
    generate one at the same moment; exactly one key wins, and every worker loads it."""
    import threading

    barrier = threading.Barrier(8)
    loaded: list[str] = []
    failures: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            loaded.append(RootKeys.from_config(None, None, tmp_path).primary_id)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(loaded) == 8 and len(set(loaded)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["root.key"]  # no temporary left behind
    assert (tmp_path / "root.key").stat().st_mode & 0o777 == 0o600
