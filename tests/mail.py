"""Pytest plugin: a REAL Postfix (Debian's package) for the SMTP front-end tests, and an undo-proxy daemon
with ``[[smtp]]`` front-ends in front of it.

Load with ``pytest_plugins = [..., "tests.mail"]`` (or ``-p tests.mail``).

The machine's Postfix binaries run as a private instance (``postfix -c <dir>``): its own main.cf/master.cf,
queue and data directories under a temp dir, listening on 127.0.0.1:<free port>. /etc/postfix and the
system instance are never touched, so the tests can run next to a system Postfix (or the acceptance check).
Mail is delivered by Postfix's ``virtual`` agent (uid/gid 5000) to Maildirs on a loop-mounted btrfs
subvolume, which is the undo-proxy's snapshot volume.

Fixtures:
    postfix      (module)   a running ``Postfix`` (see the class for its helpers)
    smtp_stack   (module)   an undo-proxy daemon (btrfs backend on the Postfix volume) with two SMTP
                            front-ends: ``mail`` (smtp_port) and ``small`` (small_port, max_message_size
                            SMALL_LIMIT); the daemon's [[http]] front-end serves the volume by WsgiDAV
"""
from __future__ import annotations

import contextlib
import email.header
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.backends import btrfs_volume, find_tool, free_port, wait_port, wsgidav_processes
from tests.daemon import Stack, write_config

VMAIL_UID = 5000
DOMAIN = "example.test"
MAILBOXES = ("alice", "bob", "carol")        # the default virtual mailbox map
SMALL_LIMIT = 20_000                         # max_message_size of the `small` front-end
POSTMASTER = f"postmaster@{DOMAIN}"

_TRACE_HEADERS = re.compile(rb"^(Return-Path|Delivered-To|X-Original-To|Received):", re.IGNORECASE)


def _run(*args: str | Path, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{[str(a) for a in args]} exited {res.returncode}:\n{res.stdout}{res.stderr}")
    return res


def header_value(message: bytes, name: str) -> str | None:
    """A header's unfolded, decoded value (RFC 2047 words decoded; raw UTF-8 as is), LF or CRLF endings."""
    text = message.replace(b"\r\n", b"\n")
    head = text.split(b"\n\n", 1)[0]
    match = re.search(rb"^" + re.escape(name.encode()) + rb":[ \t]*(.*(?:\n[ \t].*)*)", head,
                      re.IGNORECASE | re.MULTILINE)
    if not match:
        return None
    raw = b" ".join(match.group(1).split()).decode("utf-8", "replace")
    if "=?" in raw:
        return str(email.header.make_header(email.header.decode_header(raw)))
    return raw


def strip_trace(delivered: bytes) -> bytes:
    """A Maildir file as the MTA received it: CRLF line ends, without the trace headers (Return-Path,
    Delivered-To, X-Original-To, Received) that delivery put on top."""
    lines = delivered.split(b"\n")
    i = 0
    while i < len(lines) and _TRACE_HEADERS.match(lines[i]):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


@dataclass
class Postfix:
    """A private Postfix instance: config in ``base/etc``, queue in ``base/spool``, Maildirs under
    ``volume/<user>/`` for ``<user>@example.test``."""

    base: Path
    port: int
    volume: Path   # virtual_mailbox_base, a btrfs subvolume
    store: Path    # a directory on the same btrfs (for snapshots)

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(find_tool("postfix"), "-c", self.etc, *args, check=check)

    def postconf(self, *args: str) -> str:
        return _run(find_tool("postconf"), "-c", self.etc, *args).stdout

    def reload(self) -> None:
        self.postfix("reload")
        time.sleep(0.3)   # smtpd processes pick up the new tables on their next connection

    # ------------------------------------------------------------------ tables the tests edit
    def set_checks(self, header: str = "", body: str = "", reload: bool = True) -> None:
        """Replace the header_checks / body_checks regexp tables (then `postfix reload`)."""
        (self.etc / "header_checks").write_text(header + ("\n" if header else ""))
        (self.etc / "body_checks").write_text(body + ("\n" if body else ""))
        if reload:
            self.reload()

    def set_mailboxes(self, *users: str, reload: bool = True) -> None:
        """The virtual mailbox map: exactly these users of example.test (then postmap and reload)."""
        lines = []
        for user in users:
            local, _, mbox = user.partition("=")          # "p1=pile" maps p1@ to Maildir pile/
            lines.append(f"{local}@{DOMAIN} {mbox or local}/\n")
        (self.etc / "vmailbox").write_text("".join(lines))
        _run(find_tool("postmap"), self.etc / "vmailbox")
        if reload:
            self.reload()

    def reset(self) -> None:
        """Back to the default mailboxes and empty checks (reloads only when something changed)."""
        default_map = "".join(f"{u}@{DOMAIN} {u}/\n" for u in MAILBOXES)
        changed = (self.etc / "vmailbox").read_text() != default_map
        if changed:
            self.set_mailboxes(*MAILBOXES, reload=False)
        if (self.etc / "header_checks").read_text() or (self.etc / "body_checks").read_text():
            self.set_checks(reload=False)
            changed = True
        if changed:
            self.reload()

    # ------------------------------------------------------------------ what arrived
    def maildir(self, user: str) -> Path:
        return self.volume / user

    def messages(self, user: str) -> list[bytes]:
        out = []
        for sub in ("new", "cur"):
            d = self.maildir(user) / sub
            if d.is_dir():
                for f in sorted(d.iterdir()):
                    with contextlib.suppress(FileNotFoundError):
                        out.append(f.read_bytes())
        return out

    def with_subject(self, user: str, subject: str) -> list[bytes]:
        return [m for m in self.messages(user) if header_value(m, "Subject") == subject]

    def count(self, user: str, subject: str) -> int:
        return len(self.with_subject(user, subject))

    def wait_for(self, user: str, subject: str, count: int = 1, timeout: float = 15) -> list[bytes]:
        """Wait until exactly ``count`` messages with this Subject are in the user's Maildir (new/ or cur/)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.with_subject(user, subject)
            if len(found) == count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{user}: {len(found)} messages with Subject {subject!r}, want {count}; "
                                     f"log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def queue(self) -> str:
        return _run(find_tool("postqueue"), "-c", self.etc, "-j").stdout

    def wait_queue_empty(self, timeout: float = 20) -> None:
        """Wait until Postfix has finished with every message it accepted (`postqueue -j` prints nothing)."""
        deadline = time.monotonic() + timeout
        while (q := self.queue()).strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"the Postfix queue is not empty after {timeout}s:\n{q}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no maillog)"


@contextlib.contextmanager
def postfix_instance(base: Path, volume: Path, store: Path, settings: dict[str, str] | None = None,
                     port: int | None = None) -> Iterator[Postfix]:
    """Configure and start a private Postfix instance in ``base`` delivering to Maildirs in ``volume``;
    stop it on exit. ``settings`` are extra main.cf parameters."""
    etc, spool, data = base / "etc", base / "spool", base / "data"
    for d in (etc, spool, data):
        d.mkdir(parents=True)
    for name in ("main.cf", "master.cf", "dynamicmaps.cf", "postfix-files"):
        if (Path("/etc/postfix") / name).exists():
            shutil.copy(Path("/etc/postfix") / name, etc / name)
    for name in ("dynamicmaps.cf.d", "postfix-files.d"):
        if (Path("/etc/postfix") / name).is_dir():
            shutil.copytree(Path("/etc/postfix") / name, etc / name)
    shutil.chown(data, "postfix")
    os.chown(volume, VMAIL_UID, VMAIL_UID)
    pf = Postfix(base=base, port=port or free_port(), volume=volume, store=store)
    pf.set_mailboxes(*MAILBOXES, reload=False)
    pf.set_checks(reload=False)
    params = {
        "queue_directory": str(spool), "data_directory": str(data),
        "maillog_file": str(pf.maillog), "maillog_file_prefixes": str(base),
        "myhostname": "mx.example.test", "mydomain": DOMAIN, "myorigin": DOMAIN, "mydestination": "",
        "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "relayhost": "",
        # mail for other domains (relayed by trusted clients) is thrown away: nothing leaves the machine
        "default_transport": "discard", "relay_transport": "discard",
        "mynetworks": "127.0.0.1/32", "smtpd_authorized_xclient_hosts": "127.0.0.1",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "",
        "virtual_mailbox_domains": DOMAIN, "virtual_mailbox_base": str(volume),
        "virtual_mailbox_maps": f"hash:{etc / 'vmailbox'}",
        "virtual_uid_maps": f"static:{VMAIL_UID}", "virtual_gid_maps": f"static:{VMAIL_UID}",
        "header_checks": f"regexp:{etc / 'header_checks'}", "body_checks": f"regexp:{etc / 'body_checks'}",
        "smtputf8_enable": "yes", "local_header_rewrite_clients": "", "always_add_missing_headers": "no",
        "smtpd_hard_error_limit": "100", "smtpd_soft_error_limit": "50",
        "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
        "compatibility_level": "3.6",
        **(settings or {}),
    }
    pf.postconf("-e", *[f"{k}={v}" for k, v in params.items()])
    pf.postconf("-M", f"smtp/inet=127.0.0.1:{pf.port} inet n - n - - smtpd")
    pf.postconf("-F", "*/*/chroot = n")   # no chroot: the instance lives outside /var/spool/postfix
    try:
        res = pf.postfix("start", check=False)
        if res.returncode != 0:
            raise RuntimeError(f"postfix start failed ({res.returncode}):\n{res.stdout}{res.stderr}\n"
                               f"{pf.log_tail()}")
        wait_port(pf.port)
        yield pf
    finally:
        pf.postfix("stop", check=False)
        # `postfix stop` returns before the master is gone: wait, so the volume can be unmounted
        deadline = time.monotonic() + 10
        while _master_alive(spool / "pid" / "master.pid") and time.monotonic() < deadline:
            time.sleep(0.1)


def _master_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


@contextlib.contextmanager
def mail_workdir(prefix: str) -> Iterator[Path]:
    """A temp dir the Postfix users can traverse (pytest's tmp dirs are 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    """A private Postfix on 127.0.0.1:<free port> delivering to Maildirs on a btrfs subvolume."""
    with mail_workdir("undo-pf-") as base, btrfs_volume(base / "btrfs") as btr:
        btr.mount.chmod(0o755)
        with postfix_instance(base / "postfix", btr.volume, btr.store) as pf:
            yield pf


@dataclass
class MailStack(Stack):
    smtp_port: int = 0
    small_port: int = 0
    postfix: Postfix | None = None

    def start(self) -> None:
        super().start()
        wait_port(self.smtp_port, proc=self.proc)
        wait_port(self.small_port, proc=self.proc)


def smtp_tables(upstream_port: int, smtp_port: int, small_port: int) -> str:
    return f'''
[[smtp]]
name = "mail"
listen = "127.0.0.1:{smtp_port}"
upstream = "127.0.0.1:{upstream_port}"
verbs = "smtp"
hostname = "proxy.example.test"
timeout = "10s"
postmaster = "{POSTMASTER}"

[[smtp]]
name = "small"
listen = "127.0.0.1:{small_port}"
upstream = "127.0.0.1:{upstream_port}"
hostname = "proxy.example.test"
timeout = "10s"
max_message_size = {SMALL_LIMIT}
postmaster = "{POSTMASTER}"
'''


@pytest.fixture(scope="module")
def smtp_stack(postfix: Postfix, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailStack]:
    """undo-proxy serve (btrfs snapshots of the Postfix volume) with SMTP front-ends before Postfix."""
    work = tmp_path_factory.mktemp("smtp-stack")
    with wsgidav_processes(work) as dav_start:
        dav = dav_start(postfix.volume)
        stack = MailStack(workdir=work, config=work / "undo-proxy.toml", volume=postfix.volume,
                          store=postfix.store, http_port=free_port(), admin_port=free_port(), dav=dav,
                          log=work / "serve.log", smtp_port=free_port(), small_port=free_port(), postfix=postfix)
        write_config(stack, "btrfs", None, smtp_tables(postfix.port, stack.smtp_port, stack.small_port))
        stack.start()
        try:
            yield stack
        finally:
            stack.stop()
