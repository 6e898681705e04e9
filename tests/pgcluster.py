"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl on a free loopback port, one database per test."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

# Debian's layout (STACK.md): server binaries live here, off PATH; the newest major version wins.
BIN_GLOB = "/usr/lib/postgresql/*/bin"
SUPERUSER = "chronorec"
START_TIMEOUT_S = 60


def find_bin_dir() -> Path:
    """The folder holding initdb and pg_ctl: $CHRONOREC_PG_BIN, Debian's versioned folder, or PATH."""
    override = os.environ.get("CHRONOREC_PG_BIN")
    candidates = [Path(override)] if override else []
    candidates += sorted((Path(p) for p in glob.glob(BIN_GLOB)), key=lambda p: _major(p.parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "pg_ctl").is_file() and (folder / "initdb").is_file():
            return folder
    raise RuntimeError(
        f"no PostgreSQL server binaries (initdb, pg_ctl) in {BIN_GLOB} or on PATH; "
        "install them with `apt-get install -y postgresql` or set CHRONOREC_PG_BIN"
    )


def _major(name: str) -> int:
    return int(name) if name.isdigit() else -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traversable_by_others(folder: Path) -> bool:
    """True when every folder down to `folder` lets other users through (the server runs as `postgres`)."""
    for part in [folder.resolve(), *folder.resolve().parents]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return False
    return True


class PostgresCluster:
    """One PostgreSQL server in a temporary folder, reachable on 127.0.0.1:`port` without a password.

    initdb refuses to run as root, so under root every server command runs as the `postgres`
    system user (Debian's package creates it) on a folder that user owns.
    """

    def __init__(self, parent: Path | None = None) -> None:
        self.bin_dir = find_bin_dir()
        self.run_as = self._unprivileged_user()
        # mkdtemp in /tmp by default rather than pytest's tmp_path: that one is private to root
        # (0700), and the server must reach its folder; the socket path must also stay under ~100 bytes.
        if parent is not None and self.run_as and not _traversable_by_others(Path(parent)):
            parent = None  # e.g. a benchmark's work folder under pytest's private tmp: use /tmp
        self.root = Path(tempfile.mkdtemp(prefix="chronorec-pg-", dir=parent))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = 0
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")

    @staticmethod
    def _unprivileged_user() -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root, and there is no `postgres` user to run the PostgreSQL "
                               "server as (initdb refuses root); create one or run the tests as another user")
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root needs `runuser` (util-linux) to start PostgreSQL as `postgres`")
        return "postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / tool), *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=self.root)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                               + self._log_tail())
        return done

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\nserver log:\n" + "\n".join(tail) if tail else ""

    def start(self) -> None:
        """Start the server; on the first start pick a free port (retrying if another process took it)."""
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or free_port()
            options = (f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 "
                       "-c max_connections=200 -c fsync=on -c synchronous_commit=on")
            done = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path),
                             "-w", "-t", str(START_TIMEOUT_S), "start", check=False)
            if done.returncode == 0:
                self.port = port
                return
            if attempt == attempts - 1:
                raise RuntimeError(f"pg_ctl start failed on port {port}: "
                                   f"{done.stderr.strip() or done.stdout.strip()}" + self._log_tail())

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode "immediate" is a crash as far as clients can tell (no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def destroy(self) -> None:
        try:
            if self.data.exists() and self.is_running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster():
    """One server for the whole session. A server that cannot start fails every test that needs it,
    with the reason: the PostgreSQL suite is never skipped."""
    try:
        cluster = PostgresCluster()
    except Exception as exc:  # noqa: BLE001 - any reason is reported as the test failure
        pytest.fail(f"PostgreSQL cannot be set up: {exc}", pytrace=False)
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001
        cluster.destroy()
        pytest.fail(f"PostgreSQL cannot start: {exc}", pytrace=False)
    yield cluster
    cluster.destroy()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster):
    """URL of a database created for this test and dropped after it (the server is restarted
    if a test left it stopped)."""
    if not postgres_cluster.is_running():
        postgres_cluster.start()
    url = postgres_cluster.create_database()
    yield url
    if not postgres_cluster.is_running():
        postgres_cluster.start()
    postgres_cluster.drop_database(url)
