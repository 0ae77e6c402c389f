"""Pytest plugin: a real `undo-proxy serve` subprocess in front of a real WsgiDAV.

`proxy_stack(volume=None, backend="copy", timeline_url=None, extra="")` starts WsgiDAV serving the
volume and the daemon in front of it, and returns a Stack with the URLs, the config file and helpers
to run CLI commands and call the admin API.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.backends import WsgiDav, free_port, wait_port

TOKEN = "test-admin-token"
UNDO_PROXY = str(Path(sys.executable).with_name("undo-proxy"))


@dataclass
class Stack:
    workdir: Path
    config: Path
    volume: Path
    store: Path
    http_port: int
    admin_port: int
    dav: WsgiDav
    proc: subprocess.Popen | None = None
    log: Path = field(default=Path("/dev/null"))
    open_files: tuple[int, int] | None = None  # (soft, hard) RLIMIT_NOFILE the daemon is started with

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run([UNDO_PROXY, *args, "-c", str(self.config)], capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"undo-proxy {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def api(self, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
        req = urllib.request.Request(self.admin + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def start(self) -> None:
        self.cli("db", "upgrade")
        logf = open(self.log, "ab")
        limits = self.open_files
        self.proc = subprocess.Popen([UNDO_PROXY, "serve", "-c", str(self.config)], stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits))
                                     if limits else None)
        wait_port(self.http_port, proc=self.proc)
        wait_port(self.admin_port, proc=self.proc)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def timeline(self, **filters: Any) -> list[dict[str, Any]]:
        args = ["timeline", "--json"]
        for k, v in filters.items():
            args += [f"--{k}", str(v)]
        return json.loads(self.cli(*args).stdout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def write_config(stack: Stack, backend: str, timeline_url: str | None, extra: str) -> None:
    timeline = f'[timeline]\nurl = "{timeline_url}"\n' if timeline_url else ""
    stack.config.write_text(f'''[state]
dir = "{stack.workdir / 'state'}"
{timeline}
[snapshots]
backend = "{backend}"
volume = "{stack.volume}"
store = "{stack.store}"
every = "0"
keep = 20

[admin]
listen = "127.0.0.1:{stack.admin_port}"
token = "{TOKEN}"

[[http]]
name = "web"
listen = "127.0.0.1:{stack.http_port}"
upstream = "{stack.dav.url}"
verbs = "webdav"
timeout = "5s"
{extra}
''')


@pytest.fixture
def proxy_stack(tmp_path: Path, wsgidav_server: Callable[[Path], WsgiDav]) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def start(volume: Path | None = None, store: Path | None = None, backend: str = "copy",
              timeline_url: str | None = None, extra: str = "") -> Stack:
        work = tmp_path / f"stack{len(stacks)}"
        work.mkdir()
        volume = volume or work / "dav"
        store = store or work / "snaps"
        volume.mkdir(exist_ok=True)
        store.mkdir(exist_ok=True)
        dav = wsgidav_server(volume)
        stack = Stack(workdir=work, config=work / "undo-proxy.toml", volume=volume, store=store,
                      http_port=free_port(), admin_port=free_port(), dav=dav, log=work / "serve.log")
        write_config(stack, backend, timeline_url, extra)
        stacks.append(stack)
        stack.start()
        return stack

    yield start
    for stack in stacks:
        stack.kill()
