"""Pytest plugin: a REAL Dovecot (Debian's dovecot-imapd) for the IMAP front-end tests.

Load with ``pytest_plugins = [..., "tests.imapfix"]`` (or ``-p tests.imapfix``).

Dovecot runs as a private instance (``dovecot -c <conf> -F``, its own base_dir, state_dir and log under a
temp dir, listening on 127.0.0.1:<free port>): passwd-file users (uid/gid 5000) plus a master-user passdb,
Maildirs on a loop-mounted btrfs subvolume (tests.backends.btrfs_volume in a world-traversable temp
dir, since Dovecot's unprivileged processes must reach it), which is the undo-proxy's snapshot volume.

Fixtures:
    dovecot     (function)  a running ``Dovecot`` on a fresh btrfs volume (see the class for helpers)
"""
from __future__ import annotations

import imaplib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.backends import btrfs_volume, find_tool, free_port, wait_port

VMAIL_UID = 5000
USERS = {"alice": "secret", "bob": "hunter2"}
MASTER_USER, MASTER_PASSWORD = "undo", "master-secret"


@dataclass
class Dovecot:
    workdir: Path
    port: int
    volume: Path
    store: Path
    proc: subprocess.Popen | None = None

    @property
    def conf(self) -> Path:
        return self.workdir / "dovecot.conf"

    @property
    def master_pw(self) -> Path:
        return self.workdir / "master.pw"

    def start(self) -> None:
        self.proc = subprocess.Popen([find_tool("dovecot"), "-c", str(self.conf), "-F"],
                                     stdout=open(self.workdir / "out", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_port(self.port, proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"dovecot did not start: {exc}\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log(self) -> str:
        parts = [p.read_text(errors="replace")[-3000:] for p in (self.workdir / "out", self.workdir / "log")
                 if p.exists()]
        return "\n".join(parts)

    def imap(self, user: str = "alice") -> imaplib.IMAP4:
        """A session straight to Dovecot, as the user."""
        m = imaplib.IMAP4("127.0.0.1", self.port, timeout=20)
        m.login(user, USERS[user])
        return m

    def doveadm(self, *args: str, stdin: bytes | None = None) -> str:
        res = subprocess.run([find_tool("doveadm"), "-c", str(self.conf), *args], input=stdin,
                             capture_output=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)}: {res.stderr.decode(errors='replace')}")
        return res.stdout.decode(errors="replace")

    def deliver(self, user: str, mailbox: str, message: bytes) -> None:
        """Server-side delivery into a folder (what an MDA with a filter does): never through the proxy."""
        if mailbox != "INBOX" and mailbox not in self.doveadm("mailbox", "list", "-u", user).split():
            self.doveadm("mailbox", "create", "-u", user, mailbox)
        self.doveadm("save", "-u", user, "-m", mailbox, stdin=message)

    def imap_table(self, listen_port: int, name: str = "imap", extra: str = "") -> str:
        """The [[imap]] table of an undo-proxy config in front of this Dovecot."""
        return (f'\n[[imap]]\nname = "{name}"\nlisten = "127.0.0.1:{listen_port}"\nupstream = "127.0.0.1:{self.port}"\n'
                f'verbs = "imap"\nmaster_user = "{MASTER_USER}"\nmaster_password_file = "{self.master_pw}"\n'
                f'master_separator = "*"\ntimeout = "10s"\npostmaster = "postmaster@example.test"\n{extra}')


def write_config(dc: Dovecot) -> None:
    w = dc.workdir
    (w / "users").write_text("".join(f"{u}:{{PLAIN}}{p}:{VMAIL_UID}:{VMAIL_UID}::{dc.volume / u}\n"
                                     for u, p in USERS.items()))
    (w / "masters").write_text(f"{MASTER_USER}:{{PLAIN}}{MASTER_PASSWORD}\n")
    dc.master_pw.write_text(MASTER_PASSWORD + "\n")
    dc.conf.write_text(f"""base_dir = {w}/run
state_dir = {w}/state
log_path = {w}/log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
passdb {{
  driver = passwd-file
  args = {w}/masters
  master = yes
}}
passdb {{
  driver = passwd-file
  args = {w}/users
}}
userdb {{
  driver = passwd-file
  args = {w}/users
}}
service imap-login {{
  inet_listener imap {{
    port = {dc.port}
  }}
}}
""")


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    # Dovecot's auth (user dovecot) and mail (uid 5000) processes must reach these files: not under
    # pytest's private (0700) tmp_path, but a world-traversable temp dir of our own.
    base = Path(tempfile.mkdtemp(prefix="undo-dc-"))
    base.chmod(0o755)
    try:
        with btrfs_volume(base / "btrfs") as btr:
            btr.mount.chmod(0o755)
            os.chown(btr.volume, VMAIL_UID, VMAIL_UID)
            workdir = base / "dovecot"
            workdir.mkdir()
            dc = Dovecot(workdir=workdir, port=free_port(), volume=btr.volume, store=btr.store)
            write_config(dc)
            dc.start()
            try:
                yield dc
            finally:
                dc.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
