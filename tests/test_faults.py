"""Faults of the surroundings (issue 7): an upstream that is down, too slow, resets mid-response or answers
garbage; the timeline's disk full; the snapshot store full; btrfs commands failing. Each gets the documented
answer (502/504/503/451, `snapshot take` exit 1, a rewind that changes nothing), a clear log line and a
metric, and the proxy recovers by itself when the fault goes away."""
from __future__ import annotations

import contextlib
import http.client
import os
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import file_tree, find_tool, free_port, wait_port
from tests.daemon import Stack, write_config
from tests.rawnet import RawUpstream, all_verbs, count, metric, raw_frontend

UPSTREAM_ERRORS = 'undo_proxy_frontend_errors_total{protocol="http",reason="upstream"}'
TIMELINE_ERRORS = 'undo_proxy_frontend_errors_total{protocol="http",reason="timeline"}'
SMTP_UPSTREAM_ERRORS = 'undo_proxy_frontend_errors_total{protocol="smtp",reason="upstream"}'
SNAPSHOT_FAILURES = 'undo_proxy_snapshot_failures_total{operation="take"}'


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 20) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_log(stack: Stack, text: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while text not in stack.log_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {text!r}:\n{stack.log_text()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def own_stack(tmp_path: Path, wsgidav_server) -> Iterator:  # noqa: ANN001
    """Like proxy_stack, but the state dir may be put elsewhere (a tiny tmpfs) before the daemon starts."""
    stacks: list[Stack] = []

    def start(volume: Path, store: Path, backend: str = "copy", state: Path | None = None,
              extra: str = "") -> Stack:
        work = tmp_path / f"own{len(stacks)}"
        work.mkdir()
        stack = Stack(workdir=work, config=work / "undo-proxy.toml", volume=volume, store=store,
                      http_port=free_port(), admin_port=free_port(), dav=wsgidav_server(volume),
                      log=work / "serve.log")
        write_config(stack, backend, None, extra)
        if state is not None:
            text = stack.config.read_text().replace(f'dir = "{work / "state"}"', f'dir = "{state}"', 1)
            stack.config.write_text(text)
        stacks.append(stack)
        stack.start()
        return stack

    yield start
    for stack in stacks:
        stack.kill()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run([find_tool("mount"), "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run([find_tool("umount"), "-l", str(path)], check=False, timeout=30)


def fill(fs: Path) -> Path:
    """Fill a filesystem to the last byte; returns the filler file."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 512):   # then the last partial block
            for _ in range(100_000):
                try:
                    fh.write(b"\0" * size)
                except OSError:
                    break
    return filler


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


# --------------------------------------------------------------------------- upstream faults

def test_upstream_down_slow_reset_or_garbage_answers_502_504_and_recovers(proxy_stack):
    up = RawUpstream().start()
    port = up.port
    fe_port, smtp_port, dead_smtp = free_port(), free_port(), free_port()
    stack = proxy_stack(extra=raw_frontend("raw", fe_port, up.url, timeout="1s") + f'''
[[smtp]]
name = "mail"
listen = "127.0.0.1:{smtp_port}"
upstream = "127.0.0.1:{dead_smtp}"
allow_without_xclient = true
timeout = "2s"
''')
    wait_port(fe_port)
    wait_port(smtp_port)
    try:
        cases = [  # mode, expected status for a PUT, the log line
            ("down", 502, "upstream unreachable"),
            ("slow", 504, "upstream timed out"),
            ("reset", 502, "upstream"),
            ("garbage", 502, "upstream answered garbage"),
            ("close", 502, "upstream closed the connection"),
        ]
        for mode, want, line in cases:
            if mode == "down":
                up.stop()
            else:
                if up._loop is None:
                    up = RawUpstream(mode=mode).start(port)
                up.mode = mode
            errors = metric(stack, UPSTREAM_ERRORS)
            t0 = time.monotonic()
            status, body = request(fe_port, "PUT", f"/fault/{mode}", b"payload of " + mode.encode())
            assert status == want, (mode, status, body)
            assert time.monotonic() - t0 < 10
            assert b"undo-proxy" in body
            wait_log(stack, f"PUT /fault/{mode}")
            assert line in stack.log_text()
            assert metric(stack, UPSTREAM_ERRORS) > errors, mode
            # a read gets the same answer (or, when the head was already passed on, a cut connection)
            try:
                status, _ = request(fe_port, "GET", f"/fault/{mode}")
                assert status in (want, 200) if mode == "reset" else status == want, (mode, status)
            except (http.client.IncompleteRead, ConnectionError):
                assert mode == "reset"
            count("fault", 2)
        # the fault goes away: traffic flows again, nothing to restart
        up.mode = "ok"
        status, body = request(fe_port, "PUT", "/fault/after", b"fine")
        assert (status, body) == (200, b"PUT /fault/after")
        assert request(fe_port, "GET", "/fault/after") == (200, b"GET /fault/after")
        verbs = {v["targets"][0] + " " + v["verb"]: v for v in all_verbs(stack, count=12)
                 if v["frontend"] == "raw"}
        for mode, _, _ in cases:   # recorded, and never as committed
            assert verbs[f"/fault/{mode} http.put"]["status"] == "failed", verbs[f"/fault/{mode} http.put"]
        assert verbs["/fault/after http.put"]["status"] == "committed"

        # SMTP: the MTA is down -> 451 (try again later), then it comes back
        errors = metric(stack, SMTP_UPSTREAM_ERRORS)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as s:
            s.ehlo("client.example")
            code, msg = s.mail("a@example.test")
            assert code == 451, (code, msg)
        assert metric(stack, SMTP_UPSTREAM_ERRORS) > errors
        wait_log(stack, "MAIL from 127.0.0.1")
        from aiosmtpd.controller import Controller

        class Sink:
            async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
                return "250 OK queued"
        mta = Controller(Sink(), hostname="127.0.0.1", port=dead_smtp)
        mta.start()
        try:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as s:
                s.ehlo("client.example")
                s.sendmail("a@example.test", ["b@example.test"], b"Subject: back\r\n\r\nhello\r\n")
        finally:
            mta.stop()
        count("fault", 1)
    finally:
        up.stop()


# --------------------------------------------------------------------------- the timeline's disk full

@needs_root
def test_timeline_disk_full_refuses_writes_with_503_and_recovers(own_stack, tmp_path):
    volume, store = tmp_path / "dav", tmp_path / "snaps"
    volume.mkdir()
    store.mkdir()
    with tmpfs(tmp_path / "statefs", "4m") as fs:
        stack = own_stack(volume, store, state=fs / "state")
        assert request(stack.http_port, "PUT", "/before.txt", b"before")[0] == 201
        filler = fill(fs)
        refused = 0
        for i in range(3):   # small body, large body (through the blob store), and again
            body = (b"%d " % i) * (10 if i != 1 else 200_000)
            status, answer = request(stack.http_port, "PUT", f"/full{i}.txt", body)
            assert status == 503, (status, answer)
            refused += 1
            assert not (volume / f"full{i}.txt").exists(), "a refused PUT reached the backend"
        assert metric(stack, TIMELINE_ERRORS) >= refused
        assert "cannot be written" in stack.log_text()
        assert stack.api("GET", "/api/status")[0] in (200, 503)   # the admin API stays up
        filler.unlink()
        deadline = time.monotonic() + 15
        while (status := request(stack.http_port, "PUT", "/after.txt", b"after")[0]) == 503:
            assert time.monotonic() < deadline, "no recovery after space came back"
            time.sleep(0.2)
        assert status == 201
        assert (volume / "after.txt").read_bytes() == b"after"
        assert request(stack.http_port, "GET", "/after.txt") == (200, b"after")
        verbs = all_verbs(stack, count=3)
        assert not [v for v in verbs if v["targets"][0].startswith("/full") and v["status"] == "committed"]
        assert [v["status"] for v in verbs if v["targets"] == ["/after.txt"] and v["verb"] == "webdav.put"] \
            == ["committed"]
        stack.kill()
        count("fault", refused)


# --------------------------------------------------------------------------- the snapshot store full

@needs_root
def test_snapshot_store_full_fails_the_snapshot_cleanly_and_traffic_continues(own_stack, tmp_path):
    volume = tmp_path / "dav"
    volume.mkdir()
    (volume / "big.bin").write_bytes(os.urandom(3 << 20))
    with tmpfs(tmp_path / "storefs", "2m") as store:
        stack = own_stack(volume, store)
        res = stack.cli("snapshot", "take", "--label", "will-not-fit", check=False)
        assert res.returncode == 1, res
        assert "No space left on device" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) <= 3, res.stderr   # a message, not a traceback
        assert metric(stack, SNAPSHOT_FAILURES) >= 1
        assert "failed: cp" in stack.log_text()
        assert list(store.iterdir()) == [], "a failed snapshot left debris in the store"
        assert stack.cli_json("snapshot", "list") == []
        # traffic continues
        assert request(stack.http_port, "PUT", "/during.txt", b"still working")[0] == 201
        # space comes back: the next snapshot works
        assert request(stack.http_port, "DELETE", "/big.bin")[0] == 204
        snap = stack.cli_json("snapshot", "take")
        assert (store / snap["id"] / "during.txt").read_bytes() == b"still working"
        stack.kill()
        count("fault", 1)


# --------------------------------------------------------------------------- btrfs failing

FAKE_BTRFS = """#!/bin/sh
# btrfs, except that the subcommands named in {flag} fail like a broken filesystem would
for word in $(cat {flag} 2>/dev/null); do
  case " $* " in *" $word "*) echo "ERROR: injected failure: btrfs $*" >&2; exit 1;; esac
done
exec {real} "$@"
"""


@needs_root
def test_failing_btrfs_gives_a_clear_error_and_never_a_half_done_rewind(own_stack, btrfs_mount, tmp_path,
                                                                         monkeypatch):
    real = find_tool("btrfs")
    fakebin, flag = tmp_path / "fakebin", tmp_path / "btrfs-fails"
    fakebin.mkdir()
    (fakebin / "btrfs").write_text(FAKE_BTRFS.format(flag=flag, real=real))
    (fakebin / "btrfs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fakebin}:{os.environ['PATH']}")   # the daemon inherits it
    stack = own_stack(btrfs_mount.volume, btrfs_mount.store, backend="btrfs")
    port = stack.http_port
    assert request(port, "PUT", "/a.txt", b"one")[0] == 201
    status, snap = stack.api("POST", "/api/snapshots", {})
    assert status == 201, snap
    assert request(port, "PUT", "/a.txt", b"two")[0] == 204
    assert request(port, "PUT", "/b.txt", b"three")[0] == 201
    before = file_tree(btrfs_mount.volume)
    store_before = sorted(p.name for p in btrfs_mount.store.iterdir())

    # 1. every btrfs snapshot fails: `snapshot take` exits 1 with btrfs's message; traffic goes on
    flag.write_text("snapshot\n")
    failures = metric(stack, SNAPSHOT_FAILURES)
    res = stack.cli("snapshot", "take", check=False)
    assert res.returncode == 1 and "injected failure" in res.stderr, res
    assert metric(stack, SNAPSHOT_FAILURES) > failures
    # 2. a rewind whose clone fails changes nothing: volume back in place, mode live, exit 1
    res = stack.cli("rewind", "--to", snap["id"], "--yes", check=False)
    assert res.returncode == 1, res
    assert "rewind failed, nothing changed" in res.stderr and "injected failure" in res.stderr, res.stderr
    assert stack.api("GET", "/api/status")[1]["mode"] == "live"
    assert file_tree(btrfs_mount.volume) == before
    assert sorted(p.name for p in btrfs_mount.store.iterdir()) == store_before
    assert "rewind failed" in stack.log_text() and "snapshot" in stack.log_text()
    # 3. the clone works but marking the set-aside volume read-only fails: undone just the same
    flag.write_text("property\n")
    res = stack.cli("rewind", "--to", snap["id"], "--yes", check=False)
    assert res.returncode == 1, res
    assert "rewind failed, nothing changed" in res.stderr and "injected failure" in res.stderr, res.stderr
    assert stack.api("GET", "/api/status")[1]["mode"] == "live"
    assert file_tree(btrfs_mount.volume) == before
    assert sorted(p.name for p in btrfs_mount.store.iterdir() if not p.name.startswith(".")) == store_before
    assert request(port, "PUT", "/b.txt", b"three")[0] == 204   # traffic goes on (same content)
    # 4. a cancel that cannot set the pre-rewind volume writable changes nothing: the cycle stays open,
    #    traffic is refused, and `cancel` works once btrfs does
    flag.write_text("")
    assert stack.api("POST", "/api/rewind", {"to": snap["id"]})[0] == 200
    rewound = file_tree(btrfs_mount.volume)
    flag.write_text("property\n")
    res = stack.cli("cancel", check=False)
    assert res.returncode == 1 and "retry `cancel`" in res.stderr, res
    assert "cannot bring the pre-rewind state back" in stack.log_text()
    assert stack.api("GET", "/api/status")[1]["mode"] == "rewound"
    assert file_tree(btrfs_mount.volume) == rewound
    assert request(port, "PUT", "/c.txt", b"refused")[0] == 503   # nothing reaches the backend meanwhile
    flag.write_text("")              # the fault goes away
    assert stack.api("POST", "/api/cancel")[0] == 200
    assert stack.api("GET", "/api/status")[1]["mode"] == "live"
    assert file_tree(btrfs_mount.volume) == before
    # recovered: traffic, snapshots and rewinds work again
    assert request(port, "PUT", "/c.txt", b"after")[0] == 201
    assert stack.api("POST", "/api/snapshots", {})[0] == 201
    assert stack.api("POST", "/api/rewind", {"to": snap["id"]})[0] == 200
    assert stack.api("POST", "/api/cancel")[0] == 200
    assert (btrfs_mount.volume / "c.txt").read_bytes() == b"after"
    stack.kill()
    count("fault", 4)
