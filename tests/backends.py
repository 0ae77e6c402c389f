"""Pytest plugin: fixtures that start and tear down REAL backends for tests.

Load with ``pytest_plugins = ["tests.backends"]`` (or ``-p tests.backends``).

Fixtures:
    postgres_url        (session)  URL of a throwaway PostgreSQL server's ``undo_test`` db
    fresh_postgres_url  (function) URL of a new, empty database on that server
    btrfs_mount         (function) loop-mounted btrfs with subvolume ``vol`` and dir ``snaps``
    wsgidav_server      (function) factory ``start(root) -> WsgiDav`` (WsgiDAV subprocess)

Helpers: ``free_port()``, ``wait_port(port, timeout=15)``, ``find_tool(name)`` and the context managers
behind the fixtures (``postgres_server``, ``btrfs_volume``, ``wsgidav_processes``).

Everything is written to work as root (how CI runs): PostgreSQL is run as the
``postgres`` OS user. Needs the Debian packages from ``.ci/install-deps.sh``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "BtrfsMount",
    "PostgresServer",
    "WsgiDav",
    "btrfs_volume",
    "file_tree",
    "find_tool",
    "free_port",
    "postgres_server",
    "wait_port",
    "wsgidav_processes",
]

HOST = "127.0.0.1"
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# --------------------------------------------------------------------------- helpers


def file_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root, and "dir" for every directory: a state, exactly."""
    import hashlib
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


_HANDED_OUT: set[int] = set()


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free on ``host`` right now, and that no earlier call of this test run gave:
    the kernel may hand a port just closed out again, and two ports asked for one after the other (a daemon's
    front-end and admin listeners, say) would then be the same."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(
    port: int,
    timeout: float = 15,
    *,
    host: str = HOST,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises ``TimeoutError`` after ``timeout`` seconds, or ``RuntimeError`` at once
    if ``proc`` (the process expected to listen) exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def find_tool(name: str) -> str:
    """Find an executable on PATH or in the sbin dirs (CI's PATH may lack them)."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))
    if path is None:
        raise RuntimeError(f"{name!r} not found; run .ci/install-deps.sh")
    return path


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen kwargs that drop privileges to ``user`` (uid, gid and groups)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _run(*args: str | Path, timeout: float = 60, user: str | None = None) -> str:
    """Run a command, raise with its output on failure, return its stdout."""
    argv = [str(a) for a in args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **_as_user(user))
    if result.returncode != 0:
        raise RuntimeError(f"{argv} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    stdout: str = result.stdout
    return stdout


def _stop_group(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float = 10) -> None:
    """Send ``sig`` to ``proc``'s process group, wait, escalate to SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> Path:
    """Newest Debian PostgreSQL server bin dir, e.g. /usr/lib/postgresql/15/bin."""
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").is_file()]
    if not candidates:
        raise RuntimeError("no PostgreSQL server in /usr/lib/postgresql/*/bin; run .ci/install-deps.sh")
    return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)


def _pg_url(port: int, dbname: str) -> str:
    return f"postgresql+psycopg://postgres@{HOST}:{port}/{dbname}"


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL cluster (trust auth, superuser ``postgres``)."""

    bindir: Path
    basedir: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def datadir(self) -> Path:
        return self.basedir / "data"

    @property
    def logfile(self) -> Path:
        return self.basedir / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL for ``dbname`` on this server."""
        return _pg_url(self.port, dbname)

    def execute(self, statement: str, *identifiers: str) -> None:
        """Run one statement outside a transaction, ``{}`` filled with quoted identifiers."""
        import psycopg
        from psycopg import sql

        query = sql.SQL(statement).format(*map(sql.Identifier, identifiers))
        with psycopg.connect(host=HOST, port=self.port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(query)

    def create_database(self, name: str) -> str:
        self.execute("CREATE DATABASE {}", name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL if it hangs."""
        _stop_group(self.proc, signal.SIGINT, timeout=30)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a PostgreSQL server in a fresh temp dir; stop it and delete the dir on exit."""
    bindir = _pg_bindir()
    # Not under pytest's tmp dir: that is 0700 root, which the postgres user can't enter.
    # Short path in /tmp also keeps the unix socket path under its 107-byte limit.
    basedir = Path(tempfile.mkdtemp(prefix="undo-pg-"))
    user: str | None = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        user = "postgres"
        pw = pwd.getpwnam(user)
        os.chown(basedir, pw.pw_uid, pw.pw_gid)
    datadir = basedir / "data"
    try:
        initdb = [bindir / "initdb", "-D", datadir, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync"]
        _run(*initdb, timeout=120, user=user)
        port = free_port()
        with open(basedir / "postgres.log", "ab") as log:
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(datadir), "-k", str(basedir), "-p", str(port), "-h", HOST, "-F"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=basedir,
                **_as_user(user),
            )
        server = PostgresServer(bindir=bindir, basedir=basedir, port=port, proc=proc)
        try:
            pg_isready = [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port)]
            deadline = time.monotonic() + 30
            while subprocess.run(pg_isready, timeout=10, check=False).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = server.logfile.read_text(errors="replace")
                    raise RuntimeError(f"postgres did not become ready:\n{log_text}")
                time.sleep(0.1)
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(basedir, ignore_errors=True)


@pytest.fixture(scope="session")
def _postgres_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(_postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg://postgres@127.0.0.1:PORT/undo_test`` on a session-wide server."""
    return _postgres_server.create_database("undo_test")


@pytest.fixture
def fresh_postgres_url(_postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database (``undo_fresh_<hex>``) for one test, dropped afterwards."""
    name = f"undo_fresh_{uuid.uuid4().hex[:12]}"
    yield _postgres_server.create_database(name)
    _postgres_server.drop_database(name)


# --------------------------------------------------------------------------- btrfs


@dataclass(frozen=True)
class BtrfsMount:
    mount: Path  # the mount point of the filesystem
    volume: Path  # subvolume  <mount>/vol
    store: Path  # plain dir  <mount>/snaps (for snapshots)
    image: Path  # the sparse backing file


@contextlib.contextmanager
def btrfs_volume(workdir: Path, size: int = 512 * 1024 * 1024) -> Iterator[BtrfsMount]:
    """Loop-mount a fresh btrfs image under ``workdir``; lazily unmount and delete it on exit.

    ``mount -o loop`` sets the loop device's autoclear flag, so it is detached as
    soon as the (lazy) unmount completes: no loop devices leak.
    """
    image = workdir / "btrfs.img"
    mount = workdir / "mnt"
    mount.mkdir(parents=True)
    with open(image, "wb") as fh:
        fh.truncate(size)
    try:
        _run(find_tool("mkfs.btrfs"), "-q", image)
        _run(find_tool("mount"), "-t", "btrfs", "-o", "loop", image, mount)
        try:
            volume, store = mount / "vol", mount / "snaps"
            _run(find_tool("btrfs"), "subvolume", "create", volume)
            store.mkdir()
            yield BtrfsMount(mount=mount, volume=volume, store=store, image=image)
        finally:
            _run(find_tool("umount"), "-l", mount)
    finally:
        image.unlink(missing_ok=True)


@pytest.fixture
def btrfs_mount(tmp_path: Path) -> Iterator[BtrfsMount]:
    """A 512 MiB loop-mounted btrfs with subvolume ``.volume`` and plain dir ``.store``."""
    with btrfs_volume(tmp_path / "btrfs") as mounted:
        yield mounted


# --------------------------------------------------------------------------- WsgiDAV


def _wsgidav_exe() -> Path:
    # Not resolved: the venv's bin dir is next to the (possibly symlinked) interpreter.
    exe = Path(sys.executable).parent / "wsgidav"
    if not exe.is_file():
        raise RuntimeError(f"{exe} not found; install the 'test' extra (wsgidav)")
    return exe


@dataclass
class WsgiDav:
    """A WsgiDAV server subprocess (anonymous, read-write) serving ``root``."""

    root: Path
    port: int
    logfile: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15) -> None:
        argv = [
            str(_wsgidav_exe()),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--root",
            str(self.root),
            "--auth",
            "anonymous",
            "--no-config",
            "-q",
        ]
        with open(self.logfile, "ab") as log:
            # cwd outside root, and --no-config, so no stray wsgidav.yaml is picked up.
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.logfile.parent,
                start_new_session=True,
            )
        try:
            wait_port(self.port, timeout, proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.kill()
            raise RuntimeError(f"wsgidav failed to start:\n{self.logfile.read_text(errors='replace')}") from exc

    def stop(self) -> None:
        """Graceful stop (SIGTERM to the process group), SIGKILL if it hangs."""
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        """Hard crash: SIGKILL to the whole process group."""
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and root."""
        self.stop()
        self.start()


@contextlib.contextmanager
def wsgidav_processes(logdir: Path) -> Iterator[Callable[[Path], WsgiDav]]:
    """Yield ``start(root) -> WsgiDav``; every server started is killed on exit."""
    started: list[WsgiDav] = []

    def start(root: Path) -> WsgiDav:
        port = free_port()
        server = WsgiDav(root=Path(root), port=port, logfile=logdir / f"wsgidav-{port}.log")
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def wsgidav_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Path], WsgiDav]]:
    """Factory: ``start(root) -> WsgiDav``; all servers it started are killed at teardown."""
    with wsgidav_processes(tmp_path_factory.mktemp("wsgidav-logs")) as start:
        yield start
