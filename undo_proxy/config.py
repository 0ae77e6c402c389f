"""The one TOML config file: loading, validation, defaults.

Every error names the file and the key and is raised as ConfigError; the CLI turns it into exit 2.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from verbs.base import pack_target


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StateConfig:
    dir: Path


@dataclass(frozen=True)
class SnapshotConfig:
    backend: str
    volume: Path | None
    store: Path | None
    every: float  # seconds, 0 = off
    every_verbs: int
    keep: int


@dataclass(frozen=True)
class ServiceConfig:
    stop: str | None
    start: str | None
    settle: str | None = None        # polled before a snapshot until it succeeds: the backend is at rest
    settle_timeout: float = 30.0


@dataclass(frozen=True)
class AdminConfig:
    listen: HostPort
    token: str


@dataclass(frozen=True)
class HttpFrontend:
    name: str
    listen: HostPort
    upstream: str
    verbs: str
    timeout: float
    compensation_webhook: str | None
    max_body: int
    client_timeout: float = 60.0   # headers must arrive, and a body must not stall, within this


@dataclass(frozen=True)
class SmtpFrontend:
    name: str
    listen: HostPort
    upstream: HostPort
    verbs: str
    hostname: str
    timeout: float
    max_message_size: int
    allow_without_xclient: bool
    postmaster: str
    compensation_template: Path | None
    tls_cert: Path | None
    tls_key: Path | None


@dataclass(frozen=True)
class ImapFrontend:
    name: str
    listen: HostPort
    upstream: HostPort
    verbs: str
    master_user: str | None
    master_password_file: Path | None
    master_separator: str
    timeout: float = 60.0                  # upstream: connect and each response
    postmaster: str = "postmaster@localhost"   # sender of explanatory messages
    tls_cert: Path | None = None           # STARTTLS for clients when both are set
    tls_key: Path | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    state: StateConfig
    timeline_url: str
    snapshots: SnapshotConfig
    service: ServiceConfig
    admin: AdminConfig
    http: list[HttpFrontend] = field(default_factory=list)
    smtp: list[SmtpFrontend] = field(default_factory=list)
    imap: list[ImapFrontend] = field(default_factory=list)

    @property
    def blob_dir(self) -> Path:
        return self.state.dir / "blobs"

    def frontends(self) -> list[tuple[str, HttpFrontend | SmtpFrontend | ImapFrontend]]:
        """Every front-end with its table's name in the file, as errors name it: ("smtp[0]", ...)."""
        return [(f"{kind}[{i}]", fe) for kind, fes in (("http", self.http), ("smtp", self.smtp), ("imap", self.imap))
                for i, fe in enumerate(fes)]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """'90s' -> 90.0, '15m' -> 900.0, '0' -> 0.0."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like \"90s\", \"15m\" or \"2h\"")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_host_port(text: str) -> HostPort:
    """'127.0.0.1:8080', '[::1]:8080', 'localhost:25' -> HostPort."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")
    if match.group(1):
        ipaddress.IPv6Address(host)
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    elif not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in host.split(".")):
        raise ValueError(f"{host!r} is not a host name or address")
    return HostPort(host, port)


class _Section:
    """Reads one TOML table, remembering which keys were used so the rest can be reported as unknown."""

    def __init__(self, file: Path, where: str, table: Any) -> None:
        self.file, self.where = file, where
        if not isinstance(table, dict):
            self.fail("", f"must be a table, not {type(table).__name__}")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()
        self.missing: list[str] = []

    def fail(self, key: str, message: str) -> None:
        name = ".".join(part for part in (self.where, key) if part) or "config"
        raise ConfigError(f"{self.file}: {name}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *,
            convert: Callable[[Any], Any] | None = None) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                # Reported by finish(), after unknown keys: a misspelt required key is named as typed.
                self.missing.append(key)
                return None
            return convert(default) if convert and default is not None else default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__.replace("str", "string").replace("int", "integer") for k in kinds)
            article = "an" if wanted[0] in "aeiou" else "a"
            self.fail(key, f"must be {article} {wanted}, not {type(value).__name__} {value!r}")
        if convert is None:
            return value
        try:
            return convert(value)
        except (ValueError, TypeError) as exc:
            self.fail(key, str(exc))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.fail(unknown[0], "unknown key")
        if self.missing:
            self.fail(self.missing[0], "is required")


def _positive(value: int) -> int:
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    return value


def _positive_duration(value: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0, not {value!r}")
    return seconds


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value.rstrip("/")


def _timeline_url(value: str) -> str:
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
        raise ValueError(f"{value!r} is not a sqlite:/// or postgresql:// URL")
    return value


def _snapshot_backend(value: str) -> str:
    if value not in ("auto", "btrfs", "copy"):
        raise ValueError(f"must be \"auto\", \"btrfs\" or \"copy\", not {value!r}")
    return value


def _verbs_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?", value):
        raise ValueError(f"{value!r} is not a pack name or module.path:Pack")
    pack_target(value)
    return value


def _is_inside(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def find_config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("UNDO_PROXY_CONFIG")
    return Path(env) if env else Path("undo-proxy.toml")


def load_config(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (write one with `undo-proxy init`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(path, data)


def parse_config(path: Path, data: dict[str, Any]) -> Config:
    base = path.parent
    top = _Section(path, "", data)

    def section(name: str, required: bool = False) -> _Section:
        top.used.add(name)
        if name not in data and required:
            top.fail(name, "section is required")
        return _Section(path, name, data.get(name, {}))

    def resolve(p: str) -> Path:
        return (base / os.path.expanduser(p)).absolute()

    st = section("state")
    state = StateConfig(dir=resolve(st.get("dir", str, "/var/lib/undo-proxy")))
    st.finish()

    tl = section("timeline")
    default_url = f"sqlite:///{state.dir / 'timeline.db'}"
    timeline_url = tl.get("url", str, default_url, convert=_timeline_url)
    tl.finish()

    sn = section("snapshots")
    volume = sn.get("volume", str, None)
    store = sn.get("store", str, None)
    snapshots = SnapshotConfig(
        backend=sn.get("backend", str, "auto", convert=_snapshot_backend),
        volume=resolve(volume) if volume else None,
        store=resolve(store) if store else None,
        every=sn.get("every", str, "15m", convert=parse_duration),
        every_verbs=sn.get("every_verbs", int, 0, convert=_positive),
        keep=sn.get("keep", int, 48, convert=_positive),
    )
    if snapshots.volume and not snapshots.store:
        sn.fail("store", "is required when snapshots.volume is set")
    if snapshots.volume and _is_inside(state.dir, snapshots.volume):
        st.fail("dir", f"{state.dir} lies inside the volume {snapshots.volume}; "
                       "a rewind would roll back the timeline itself")
    if snapshots.volume and snapshots.store and _is_inside(snapshots.store, snapshots.volume):
        sn.fail("store", f"{snapshots.store} lies inside the volume {snapshots.volume}")
    sn.finish()

    sv = section("service")
    service = ServiceConfig(stop=sv.get("stop", str, None), start=sv.get("start", str, None),
                            settle=sv.get("settle", str, None),
                            settle_timeout=sv.get("settle_timeout", str, "30s", convert=parse_duration))
    sv.finish()

    ad = section("admin")
    listen = ad.get("listen", str, "127.0.0.1:8700", convert=parse_host_port)
    token = ad.get("token", str, None)
    token_file = ad.get("token_file", str, None)
    token_env = ad.get("token_env", str, None)
    if sum(x is not None for x in (token, token_file, token_env)) > 1:
        ad.fail("token_file" if token_file else "token_env", "set one of token, token_file and token_env")
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            ad.fail("token_env", f"the environment variable {token_env} is not set")
    if token_file:
        try:
            token = resolve(token_file).read_text().strip()
        except OSError as exc:
            ad.fail("token_file", f"cannot read {token_file}: {exc.strerror}")
    if token is not None and len(token) < 8:
        ad.fail("token_file" if token_file else "token_env" if token_env else "token",
                "the token must be at least 8 characters")
    ad.finish()
    admin = AdminConfig(listen=listen, token=token or "")

    names: set[str] = set()

    def frontends(kind: str) -> list[_Section]:
        top.used.add(kind)
        items = data.get(kind, [])
        if not isinstance(items, list):
            top.fail(kind, f"must be an array of tables ([[{kind}]])")
        sections = [_Section(path, f"{kind}[{i}]", item) for i, item in enumerate(items)]
        for s in sections:
            name = s.get("name", str, kind)
            if name in names:
                s.fail("name", f"{name!r} is used by another front-end")
            names.add(name)
        return sections

    http = []
    for s in frontends("http"):
        http.append(HttpFrontend(
            name=s.table.get("name", "http"),
            listen=s.get("listen", str, convert=parse_host_port),
            upstream=s.get("upstream", str, convert=_http_url),
            verbs=s.get("verbs", str, "http", convert=_verbs_name),
            timeout=s.get("timeout", str, "60s", convert=parse_duration),
            compensation_webhook=s.get("compensation_webhook", str, None, convert=_http_url),
            max_body=s.get("max_body", int, 1 << 30, convert=_positive),
            client_timeout=s.get("client_timeout", str, "60s", convert=_positive_duration),
        ))
        s.finish()
    smtp = []
    for s in frontends("smtp"):
        template = s.get("compensation_template", str, None)
        cert, key = s.get("tls_cert", str, None), s.get("tls_key", str, None)
        if bool(cert) != bool(key):
            s.fail("tls_key" if cert else "tls_cert", "tls_cert and tls_key go together")
        smtp.append(SmtpFrontend(
            name=s.table.get("name", "smtp"),
            listen=s.get("listen", str, convert=parse_host_port),
            upstream=s.get("upstream", str, convert=parse_host_port),
            verbs=s.get("verbs", str, "smtp", convert=_verbs_name),
            hostname=s.get("hostname", str, "undo-proxy.localdomain"),
            timeout=s.get("timeout", str, "60s", convert=parse_duration),
            max_message_size=s.get("max_message_size", int, 35 * 1024 * 1024, convert=_positive),
            allow_without_xclient=s.get("allow_without_xclient", bool, False),
            postmaster=s.get("postmaster", str, "postmaster@localhost"),
            compensation_template=resolve(template) if template else None,
            tls_cert=resolve(cert) if cert else None,
            tls_key=resolve(key) if key else None,
        ))
        s.finish()
    imap = []
    for s in frontends("imap"):
        pw = s.get("master_password_file", str, None)
        master = s.get("master_user", str, None)
        if bool(master) != bool(pw):
            s.fail("master_password_file" if master else "master_user",
                   "master_user and master_password_file go together")
        separator = s.get("master_separator", str, "*")
        if not 0 < len(separator) <= 4 or any(c.isspace() or c == '"' for c in separator):
            s.fail("master_separator", f"must be 1-4 characters without spaces or quotes, not {separator!r}")
        cert, key = s.get("tls_cert", str, None), s.get("tls_key", str, None)
        if bool(cert) != bool(key):
            s.fail("tls_key" if cert else "tls_cert", "tls_cert and tls_key go together")
        imap.append(ImapFrontend(
            name=s.table.get("name", "imap"),
            listen=s.get("listen", str, convert=parse_host_port),
            upstream=s.get("upstream", str, convert=parse_host_port),
            verbs=s.get("verbs", str, "imap", convert=_verbs_name),
            master_user=master,
            master_password_file=resolve(pw) if pw else None,
            master_separator=separator,
            timeout=s.get("timeout", str, "60s", convert=parse_duration),
            postmaster=s.get("postmaster", str, "postmaster@localhost"),
            tls_cert=resolve(cert) if cert else None,
            tls_key=resolve(key) if key else None,
        ))
        if imap[-1].timeout <= 0:
            s.fail("timeout", "must be more than 0")
        s.finish()

    listens = [("admin.listen", admin.listen)] + [
        (f"{kind}[{i}].listen", fe.listen)
        for kind, fes in (("http", http), ("smtp", smtp), ("imap", imap)) for i, fe in enumerate(fes)]
    seen: dict[HostPort, str] = {}
    for key, hp in listens:
        if hp in seen:
            raise ConfigError(f"{path}: {key}: {hp} is already used by {seen[hp]}")
        seen[hp] = key
    top.finish()
    return Config(path=path, state=state, timeline_url=timeline_url, snapshots=snapshots,
                  service=service, admin=admin, http=http, smtp=smtp, imap=imap)


SAMPLE = '''\
# undo-proxy configuration. Every key is shown; commented ones have their defaults.
# Durations are strings like "90s", "15m", "2h".

[state]
# Timeline database (SQLite by default), blob store and lock file. Must lie OUTSIDE the volume.
dir = "{state_dir}"

[timeline]
# Default: sqlite:///<state.dir>/timeline.db. For several proxies: a PostgreSQL URL,
# e.g. "postgresql+psycopg://undo:secret@db/undo".
# url = "sqlite:///{state_dir}/timeline.db"

[snapshots]
backend = "auto"                  # "btrfs" | "copy" | "auto" (btrfs when the volume is a subvolume)
volume = "{volume}"               # the backend's hard state
store = "{store}"                 # snapshots live here (the same btrfs filesystem for btrfs)
every = "15m"                     # periodic snapshots; "0" turns them off
every_verbs = 0                   # also after this many mutating verbs; 0 = off
keep = 48                         # retention: newest N (snapshots an open cycle needs are kept)

[service]
# How the backend is stopped and started around a rewind (optional).
# stop = "systemctl stop dovecot postfix"
# start = "systemctl start dovecot postfix"
# Polled (with traffic held) before each snapshot until it exits 0: the backend has nothing in flight.
# For Postfix, whose 250 comes before delivery: an empty queue.
# settle = 'test -z "$(postqueue -j)"'
# settle_timeout = "30s"

[admin]
listen = "127.0.0.1:8700"         # JSON API under /api, web UI under /, metrics at /metrics
token = "{token}"
# token_file = "/etc/undo-proxy/admin.token"       # or: the token in a file
# token_env = "UNDO_PROXY_ADMIN_TOKEN"             # or: in an environment variable

[[http]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:8081"
verbs = "webdav"                  # "http" | "webdav" | "module.path:Pack"
# timeout = "60s"                 # upstream timeout (504 after it)
# max_body = 1073741824           # largest request body accepted (413 above)
# client_timeout = "60s"          # a client's headers must arrive within it, its body must not stall longer
# compensation_webhook = "https://ops.example/undo-hook"   # POSTed each inconsistency as JSON

# [[smtp]]
# name = "mail"
# listen = "127.0.0.1:2525"
# upstream = "127.0.0.1:25"       # the MTA; it must offer XCLIENT to the proxy
# verbs = "smtp"
# hostname = "mail.example.org"   # the name in the greeting
# max_message_size = 36700160     # SIZE
# timeout = "60s"                 # upstream timeout
# postmaster = "postmaster@example.org"            # sender of explanatory messages
# compensation_template = "/etc/undo-proxy/mail-explanation.txt"   # Jinja2; a built-in one otherwise
# allow_without_xclient = false   # true: accept that the MTA sees every client as the proxy (open-relay risk)
# tls_cert = "/etc/ssl/mail.pem"  # STARTTLS when both are set
# tls_key = "/etc/ssl/mail.key"

# [[imap]]
# name = "imap"
# listen = "127.0.0.1:1143"
# upstream = "127.0.0.1:143"      # Dovecot (plain IMAP on a local address)
# verbs = "imap"
# master_user = "undo"            # replay logs in as <user><separator><master_user> (Dovecot master user)
# master_password_file = "/etc/undo-proxy/imap-master.pw"
# master_separator = "*"
# timeout = "60s"                 # upstream: connecting, and each response
# postmaster = "postmaster@example.org"            # sender of explanatory messages
# tls_cert = "/etc/ssl/mail.pem"  # STARTTLS for clients when both are set
# tls_key = "/etc/ssl/mail.key"
'''


def sample_config(directory: Path, token: str) -> str:
    directory = directory.absolute()
    return SAMPLE.format(state_dir=directory / "state", volume=directory / "data",
                         store=directory / "snapshots", token=token)
