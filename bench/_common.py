"""Shared helpers for the benchmarks in bench/: real processes (nginx, WsgiDAV, undo-proxy, mitmdump),
wrk runs, the admin API, machine facts, and the generated sections of docs/benchmarks.md.

Benchmarks are run by hand (not by CI), as root on the target machine, from the repository root with the
project venv, e.g. `/work/venv/bin/python bench/http_overhead.py`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
HOST = "127.0.0.1"
TOKEN = "bench-admin-token"
BIN = Path(sys.executable).parent          # the project venv's bin dir
UNDO_PROXY = str(BIN / "undo-proxy")
WSGIDAV = str(BIN / "wsgidav")
MITM_VENV = Path(os.environ.get("MITM_VENV", "/tmp/mitm-venv"))
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# --------------------------------------------------------------------------- small helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if not path:
        raise SystemExit(f"{name} is not installed (apt-get install the packages in .ci/install-deps.sh)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30,
              logfile: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile and logfile.exists() else ""
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode} before listening on {port}\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {port}")
        time.sleep(0.05)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_ms(v: float) -> str:
    return "n/a" if v != v else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


# --------------------------------------------------------------------------- processes

class Procs:
    """Subprocesses started by a benchmark; all of them are stopped (process group) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], logfile: Path, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_nginx(procs: Procs, workdir: Path, root: Path, port: int, dav: bool = False,
                workers: int = 1) -> subprocess.Popen:
    """nginx in the foreground with its own config, pid and temp dirs in workdir."""
    nginx = tool("nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / d).mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    dav_conf = ("dav_methods PUT DELETE MKCOL COPY MOVE; create_full_put_path on; "
                "dav_access user:rw group:rw all:r; client_max_body_size 64m;") if dav else ""
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
{user}
daemon off;
master_process on;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port};
        root {root};
        {dav_conf}
    }}
}}
""")
    logf = workdir / "nginx.out"
    proc = procs.start([nginx, "-c", str(conf), "-p", str(workdir)], logf)
    wait_port(port, proc, logfile=logf)
    return proc


def start_wsgidav(procs: Procs, root: Path, port: int, logdir: Path) -> subprocess.Popen:
    logf = logdir / f"wsgidav-{port}.log"
    proc = procs.start([WSGIDAV, "--host", HOST, "--port", str(port), "--root", str(root), "--auth", "anonymous",
                        "--no-config", "-q"], logf, cwd=logdir)
    wait_port(port, proc, logfile=logf)
    return proc


def ensure_mitmdump() -> str:
    """mitmdump from a separate venv (never the project's): created on first use."""
    exe = MITM_VENV / "bin" / "mitmdump"
    if not exe.exists():
        log(f"installing mitmproxy into {MITM_VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True)
        subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", "mitmproxy"], check=True)
    return str(exe)


def mitm_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"Mitmproxy:\s*(\S+)", out)
    return m.group(1) if m else "?"


def start_mitmdump(procs: Procs, upstream_port: int, port: int, flows: Path, workdir: Path) -> subprocess.Popen:
    exe = ensure_mitmdump()
    logf = workdir / f"mitmdump-{port}.log"
    proc = procs.start([exe, "--mode", f"reverse:http://{HOST}:{upstream_port}", "--listen-host", HOST,
                        "--listen-port", str(port), "-w", str(flows), "-q",
                        "--set", f"confdir={workdir / 'mitm-conf'}"], logf, cwd=workdir)
    wait_port(port, proc, timeout=60, logfile=logf)
    return proc


@dataclass
class UndoProxy:
    """An `undo-proxy serve` subprocess with a generated config."""
    workdir: Path
    upstream: str
    volume: Path | None = None
    store: Path | None = None
    backend: str = "copy"
    timeout: str = "30s"
    http_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.workdir / "undo-proxy.toml"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def admin(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        snaps = ""
        if self.volume is not None:
            snaps = (f'[snapshots]\nbackend = "{self.backend}"\nvolume = "{self.volume}"\n'
                     f'store = "{self.store}"\nevery = "0"\nkeep = 1000\n')
        self.config.write_text(f'''[state]
dir = "{self.workdir / 'state'}"

{snaps}
[admin]
listen = "{HOST}:{self.admin_port}"
token = "{TOKEN}"

[[http]]
name = "web"
listen = "{HOST}:{self.http_port}"
upstream = "{self.upstream}"
verbs = "webdav"
timeout = "{self.timeout}"
''')

    def start(self, procs: Procs) -> "UndoProxy":
        self.write_config()
        subprocess.run([UNDO_PROXY, "db", "upgrade", "-c", str(self.config)], check=True, capture_output=True)
        logf = self.workdir / "serve.log"
        self.proc = procs.start([UNDO_PROXY, "serve", "-c", str(self.config)], logf)
        wait_port(self.http_port, self.proc, logfile=logf)
        wait_port(self.admin_port, self.proc, logfile=logf)
        return self

    def api(self, method: str, path: str, body: Any = None, timeout: float = 3600) -> Any:
        req = urllib.request.Request(self.admin + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw.decode()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path} -> {exc.code}: {exc.read()[:500]!r}") from None

    def metrics(self) -> dict[str, float]:
        text = self.api("GET", "/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("undo_proxy_") and " " in line:
                name, value = line.rsplit(" ", 1)
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


# --------------------------------------------------------------------------- wrk

@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non2xx: int
    command: str

    def row(self, name: str, ratio: str = "") -> str:
        errs = self.errors + self.non2xx
        return (f"| {name} | {self.rps:,.0f} | {fmt_ms(self.p50_ms)} | {fmt_ms(self.p99_ms)} | {self.requests:,} | "
                f"{errs} | {ratio} |")


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[unit]


def wrk(url: str, threads: int = 2, connections: int = 32, duration: int = 8, script: Path | None = None,
        env: dict[str, str] | None = None) -> WrkResult:
    argv = [tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    if script:
        argv += ["-s", str(script)]
    argv.append(url)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         env={**os.environ, **(env or {})})
    out = res.stdout
    if res.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed: {res.stderr}\n{out}")
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    shown = " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]])
    return WrkResult(rps, p50, p99, total, errs, non2xx, shown)


def wrk_version() -> str:
    res = subprocess.run([tool("wrk"), "-v"], capture_output=True, text=True)
    first = (res.stdout + res.stderr).strip().splitlines()
    return first[0] if first else "wrk"


WRK_TABLE_HEAD = ("| setup | req/s | p50 ms | p99 ms | requests | errors | ratio |\n"
                  "|---|---:|---:|---:|---:|---:|---|")


# --------------------------------------------------------------------------- docs/benchmarks.md

def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    distro = "?"
    with contextlib.suppress(OSError):
        m = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())
        distro = m.group(1) if m else distro
    return (f"{os.cpu_count()} cores ({cpu}), {mem} RAM, {distro}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def git_rev() -> str:
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (res.stdout.strip() or "?") + (" + uncommitted changes" if dirty else "")


DOC_HEAD = """# Benchmarks

Figures produced by the scripts in `bench/` (run by hand, not by CI: they need root for btrfs and take a
few minutes each). Each section below is generated by its script and replaced when the script runs again;
the text outside the generated sections is kept.

"""


START_LOAD = os.getloadavg()


def load_note() -> str:
    """The machine's load during the run: figures taken while other work ran are not comparable."""
    end = os.getloadavg()
    busy = max(START_LOAD[0], end[0]) > 1.5
    return (f"load average (1 min) {START_LOAD[0]:.1f} at the start, {end[0]:.1f} at the end"
            + (" (**other work was running on the machine: the figures are pessimistic and noisy**)"
               if busy else ""))


def write_section(name: str, body: str, command: str) -> None:
    """Replace (or append) the generated section for benchmark `name` in docs/benchmarks.md."""
    begin, end = f"<!-- BEGIN {name} (generated) -->", f"<!-- END {name} -->"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"{begin}\n## `{name}`\n\n"
               f"- machine: {machine()}\n- {load_note()}\n- date: {now}\n- code: `{git_rev()}`\n"
               f"- command: `{command}`\n\n"
               f"{body.strip()}\n{end}")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else DOC_HEAD
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text if text.endswith("\n") else text + "\n")
    log(f"wrote the {name} section of {DOC}")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return " ".join(shlex.quote(a) for a in ["python", str(script), *sys.argv[1:]])


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    import tempfile
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
