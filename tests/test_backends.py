"""Exercise the real-backend fixtures of tests/backends.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.backends import (
    BtrfsMount,
    WsgiDav,
    btrfs_volume,
    find_tool,
    free_port,
    postgres_server,
    wait_port,
    wsgidav_processes,
)

# --------------------------------------------------------------------------- helpers


def test_free_port_is_bindable_and_wait_port_sees_listener() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            wait_port(port, timeout=0.3)  # bound but not listening
        sock.listen()
        wait_port(port, timeout=2)


def test_wait_port_fails_fast_when_process_dies() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=5)
    with pytest.raises(RuntimeError, match="exited"):
        wait_port(free_port(), timeout=10, proc=proc)


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_url_is_a_live_database(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert postgres_url.endswith("/undo_test")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            assert conn.scalar(sa.text("SELECT current_database()")) == "undo_test"
            assert conn.scalar(sa.text("SHOW fsync")) == "off"
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (id serial PRIMARY KEY, v text)"))
            conn.execute(sa.text("INSERT INTO t (v) VALUES ('hello')"))
        with engine.connect() as conn:
            assert "hello" in conn.scalars(sa.text("SELECT v FROM t")).all()
    finally:
        engine.dispose()


_fresh_names: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
def test_fresh_postgres_url_is_empty_unique_and_dropped(run: int, fresh_postgres_url: str, postgres_url: str) -> None:
    engine = sa.create_engine(fresh_postgres_url)
    try:
        with engine.begin() as conn:
            name = conn.scalar(sa.text("SELECT current_database()"))
            tables = conn.scalars(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).all()
            assert tables == []  # empty, even though undo_test has a table
            conn.execute(sa.text("CREATE TABLE leftover (id int)"))
            fresh = conn.scalars(sa.text("SELECT datname FROM pg_database WHERE datname LIKE 'undo_fresh_%'")).all()
    finally:
        engine.dispose()
    assert name != "undo_test" and name not in _fresh_names
    assert fresh == [name]  # databases of earlier tests were dropped
    _fresh_names.append(name)


def test_postgres_server_stops_and_cleans_up() -> None:
    with postgres_server() as server:
        engine = sa.create_engine(server.url())
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT current_user")) == "postgres"
        engine.dispose()
        basedir, proc = server.basedir, server.proc
        assert proc.poll() is None
    assert proc.returncode is not None
    assert not basedir.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


# --------------------------------------------------------------------------- btrfs


def _fstype(path: Path) -> str:
    return subprocess.run(
        [find_tool("findmnt"), "-n", "-o", "FSTYPE", "--mountpoint", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()


def test_btrfs_mount_supports_snapshots(btrfs_mount: BtrfsMount) -> None:
    assert _fstype(btrfs_mount.mount) == "btrfs"
    assert btrfs_mount.volume == btrfs_mount.mount / "vol"
    assert btrfs_mount.store == btrfs_mount.mount / "snaps"
    assert btrfs_mount.volume.stat().st_ino == 256  # a subvolume root
    assert btrfs_mount.store.is_dir() and btrfs_mount.store.stat().st_ino != 256
    (btrfs_mount.volume / "f.txt").write_text("v1")
    snap = btrfs_mount.store / "s1"
    subprocess.run(
        [find_tool("btrfs"), "subvolume", "snapshot", "-r", str(btrfs_mount.volume), str(snap)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    (btrfs_mount.volume / "f.txt").write_text("v2")
    assert (snap / "f.txt").read_text() == "v1"
    assert (btrfs_mount.volume / "f.txt").read_text() == "v2"


def _loop_devices() -> str:
    return subprocess.run([find_tool("losetup"), "-a"], capture_output=True, text=True, timeout=10, check=True).stdout


def test_btrfs_volume_unmounts_and_leaks_no_loop_device(tmp_path: Path) -> None:
    with btrfs_volume(tmp_path) as mounted:
        image = mounted.image
        assert image.exists()
        assert str(image) in _loop_devices()
        (mounted.volume / "busy").write_text("x")
    assert _fstype(mounted.mount) == ""
    assert not image.exists()
    assert str(image) not in _loop_devices()


# --------------------------------------------------------------------------- WsgiDAV


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


def _put(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def test_wsgidav_serves_reads_and_writes(wsgidav_server: Callable[[Path], WsgiDav], tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hi there")
    dav = wsgidav_server(tmp_path)
    assert dav.url == f"http://127.0.0.1:{dav.port}"
    assert _get(f"{dav.url}/hello.txt") == b"hi there"
    assert _put(f"{dav.url}/new.txt", b"written") in (201, 204)
    assert (tmp_path / "new.txt").read_bytes() == b"written"
    req = urllib.request.Request(f"{dav.url}/", method="PROPFIND", headers={"Depth": "1"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 207 and b"new.txt" in resp.read()


def test_wsgidav_kill_and_restart(wsgidav_server: Callable[[Path], WsgiDav], tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    dav = wsgidav_server(tmp_path)
    assert dav.proc is not None and os.getpgid(dav.proc.pid) == dav.proc.pid  # own process group
    dav.kill()
    assert dav.proc.returncode == -signal.SIGKILL
    with pytest.raises(urllib.error.URLError):
        _get(f"{dav.url}/a.txt")
    dav.restart()
    assert dav.running
    assert _get(f"{dav.url}/a.txt") == b"a"
    port = dav.port
    dav.stop()
    assert not dav.running
    dav.restart()
    assert dav.port == port and _get(f"{dav.url}/a.txt") == b"a"


def test_wsgidav_processes_killed_on_exit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with wsgidav_processes(tmp_path) as start:
        servers = [start(root), start(root)]
        assert len({s.port for s in servers}) == 2
        assert all(s.running for s in servers)
    assert not any(s.running for s in servers)
    for s in servers:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
