"""A private instance of the machine's Postfix for `undo-proxy demo`: its own config, queue and data
directories under the demo's work dir, listening on a loopback port, delivering to Maildirs in the
volume — the system's own Postfix (if any) is not touched."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

SBIN = "/usr/sbin:/sbin:/usr/local/sbin"
VMAIL_UID = 5000


def postfix_binary() -> str | None:
    return shutil.which("postfix", path=f"{SBIN}:{os.environ.get('PATH', '')}")


class PrivatePostfix:
    def __init__(self, base: Path, maildirs: Path, domain: str, users: list[str], port: int) -> None:
        self.base, self.maildirs, self.domain, self.users, self.port = base, maildirs, domain, users, port
        self.etc = base / "etc"
        self.binary = postfix_binary() or "postfix"
        self.postconf_bin = shutil.which("postconf", path=SBIN) or "postconf"
        self.postmap_bin = shutil.which("postmap", path=SBIN) or "postmap"
        self.postqueue_bin = shutil.which("postqueue", path=SBIN) or "postqueue"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            log = self.base / "maillog"
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            why = (res.stderr or res.stdout).strip() or " / ".join(tail) or f"exit {res.returncode}"
            raise RuntimeError(f"{' '.join(argv[:3])} failed: {why[:300]}")
        return res

    @property
    def settle_command(self) -> str:
        """For [service] settle: succeeds once everything Postfix accepted is delivered."""
        return f'test -z "$({self.postqueue_bin} -c {self.etc} -j)"'

    def start(self) -> None:
        spool, data = self.base / "spool", self.base / "data"
        for d in (self.etc, spool, data):
            d.mkdir(parents=True)
        for name in ("main.cf", "master.cf", "dynamicmaps.cf", "postfix-files"):
            if (Path("/etc/postfix") / name).exists():
                shutil.copy(Path("/etc/postfix") / name, self.etc / name)
        for name in ("dynamicmaps.cf.d", "postfix-files.d"):
            if (Path("/etc/postfix") / name).is_dir():
                shutil.copytree(Path("/etc/postfix") / name, self.etc / name)
        shutil.chown(data, "postfix")
        self.maildirs.mkdir(parents=True, exist_ok=True)
        os.chown(self.maildirs, VMAIL_UID, VMAIL_UID)
        (self.etc / "vmailbox").write_text("".join(f"{u}@{self.domain} {u}/\n" for u in self.users))
        self._run(self.postmap_bin, f"hash:{self.etc / 'vmailbox'}")
        (self.etc / "header_checks").write_text("")
        params = {
            "queue_directory": str(spool), "data_directory": str(data),
            "maillog_file": str(self.base / "maillog"), "maillog_file_prefixes": str(self.base),
            "myhostname": f"mx.{self.domain}", "mydomain": self.domain, "myorigin": self.domain,
            "mydestination": "", "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "relayhost": "",
            # nothing leaves the machine: mail for other domains is thrown away
            "default_transport": "discard", "relay_transport": "discard",
            "mynetworks": "127.0.0.1/32", "smtpd_authorized_xclient_hosts": "127.0.0.1",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": self.domain, "virtual_mailbox_base": str(self.maildirs),
            "virtual_mailbox_maps": f"hash:{self.etc / 'vmailbox'}",
            "virtual_uid_maps": f"static:{VMAIL_UID}", "virtual_gid_maps": f"static:{VMAIL_UID}",
            "header_checks": f"regexp:{self.etc / 'header_checks'}", "smtputf8_enable": "yes",
            "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
            "compatibility_level": "3.6",
        }
        self._run(self.postconf_bin, "-c", str(self.etc), "-e", *[f"{k}={v}" for k, v in params.items()])
        self._run(self.postconf_bin, "-c", str(self.etc), "-M",
                  f"smtp/inet=127.0.0.1:{self.port} inet n - n - - smtpd")
        self._run(self.postconf_bin, "-c", str(self.etc), "-F", "*/*/chroot = n")
        self._run(self.binary, "-c", str(self.etc), "start")

    def set_header_checks(self, rules: str) -> None:
        (self.etc / "header_checks").write_text(rules)
        self._run(self.binary, "-c", str(self.etc), "reload")

    def wait_queue_empty(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while subprocess.run(["sh", "-c", self.settle_command]).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix's queue did not drain within {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run([self.binary, "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        pidfile = self.base / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(int(pidfile.read_text().split()[0]), 0)
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.1)
