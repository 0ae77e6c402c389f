#!/usr/bin/env python3
"""HTTP overhead of undo-proxy, side by side in one run (issue 2, "Speed").

wrk against (a) the upstream directly, (b) undo-proxy recording durably (SQLite timeline in a temp dir),
(c) `mitmdump --mode reverse:… -w FILE` recording the same traffic; first with nginx serving a 2 KiB file,
then with WsgiDAV serving a 2 KiB file. Then a mutating workload (wrk PUTs 2 KiB bodies to distinct paths)
through undo-proxy vs directly on WsgiDAV, with the group-commit batch size from /metrics.

Targets (2 cores): undo-proxy >= 6x mitmdump's req/s on nginx; undo-proxy >= 0.9x direct req/s on WsgiDAV.

Usage: /work/venv/bin/python bench/http_overhead.py [--duration 8] [--connections 32] [--threads 2]
       [--no-write] [--keep]
Needs: wrk, nginx (Debian), WsgiDAV in the venv, mitmproxy in a separate venv ($MITM_VENV, default
/tmp/mitm-venv; created on first use).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

PUT_LUA = r"""
-- PUT 2 KiB bodies, each to a new path, each with distinct content.
local prefix = os.getenv("BENCH_PREFIX") or "run"
local filler = string.rep("abcdefghijklmnopqrstuvwxyz012345", 64)  -- 2048 bytes
local counter = 0
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function request()
  counter = counter + 1
  local head = string.format("%s-%d-%d\n", prefix, tid or 0, counter)
  local body = head .. string.sub(filler, #head + 1)
  return wrk.format("PUT", "/put/" .. prefix .. "-" .. (tid or 0) .. "-" .. counter .. ".txt",
                    {["Content-Type"] = "application/octet-stream"}, body)
end
"""


def measure(name: str, url: str, args: argparse.Namespace, script: Path | None = None,
            env: dict[str, str] | None = None) -> c.WrkResult:
    if args.warmup:
        c.wrk(url, args.threads, args.connections, args.warmup, script,
              env={**(env or {}), "BENCH_PREFIX": (env or {}).get("BENCH_PREFIX", "x") + "-warm"})
    res = c.wrk(url, args.threads, args.connections, args.duration, script, env)
    c.log(f"{name}: {res.rps:,.0f} req/s, p50 {c.fmt_ms(res.p50_ms)} ms, p99 {c.fmt_ms(res.p99_ms)} ms, "
          f"{res.errors} socket errors, {res.non2xx} non-2xx")
    return res


def batch_stats(before: dict[str, float], after: dict[str, float]) -> tuple[float, float, float]:
    """(commits, mean writes per commit, mean commit ms) between two /metrics readings."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)
    n = d("undo_proxy_timeline_commit_batch_size_count")
    writes = d("undo_proxy_timeline_commit_batch_size_sum")
    secs = d("undo_proxy_timeline_commit_seconds_sum")
    return n, (writes / n if n else float("nan")), (secs / n * 1000 if n else float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each run (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    mitmdump = c.ensure_mitmdump()
    rows: dict[str, c.WrkResult] = {}
    batch: tuple[float, float, float] = (0, float("nan"), float("nan"))
    flows_size: dict[str, int] = {}
    with c.workdir("undo-bench-http-", args.keep) as work, c.Procs() as procs:
        payload = os.urandom(2048)
        # ---------------------------------------------------------------- nginx
        www = work / "www"
        www.mkdir()
        (www / "file.bin").write_bytes(payload)
        nginx_port = c.free_port()
        c.start_nginx(procs, work / "nginx", www, nginx_port)
        c.log(f"nginx on {nginx_port}")
        rows["nginx direct"] = measure("nginx direct", f"http://{c.HOST}:{nginx_port}/file.bin", args)

        proxy = c.UndoProxy(work / "proxy-nginx", f"http://{c.HOST}:{nginx_port}").start(procs)
        rows["nginx undo-proxy"] = measure("nginx via undo-proxy", f"{proxy.url}/file.bin", args)
        c.Procs.stop(proxy.proc)

        flows = work / "nginx.flows"
        mport = c.free_port()
        mproc = c.start_mitmdump(procs, nginx_port, mport, flows, work)
        rows["nginx mitmdump"] = measure("nginx via mitmdump", f"http://{c.HOST}:{mport}/file.bin", args)
        c.Procs.stop(mproc)
        flows_size["nginx"] = flows.stat().st_size if flows.exists() else 0

        # ---------------------------------------------------------------- WsgiDAV
        dav = work / "dav"
        (dav / "put").mkdir(parents=True)
        (dav / "file.bin").write_bytes(payload)
        dav_port = c.free_port()
        c.start_wsgidav(procs, dav, dav_port, work)
        c.log(f"WsgiDAV on {dav_port}")
        rows["dav direct"] = measure("WsgiDAV direct", f"http://{c.HOST}:{dav_port}/file.bin", args)

        proxy = c.UndoProxy(work / "proxy-dav", f"http://{c.HOST}:{dav_port}").start(procs)
        rows["dav undo-proxy"] = measure("WsgiDAV via undo-proxy", f"{proxy.url}/file.bin", args)

        flows = work / "dav.flows"
        mport = c.free_port()
        mproc = c.start_mitmdump(procs, dav_port, mport, flows, work)
        rows["dav mitmdump"] = measure("WsgiDAV via mitmdump", f"http://{c.HOST}:{mport}/file.bin", args)
        c.Procs.stop(mproc)

        # ---------------------------------------------------------------- PUT workload
        lua = work / "put.lua"
        lua.write_text(PUT_LUA)
        stamp = str(int(time.time()))
        rows["put direct"] = measure("PUT WsgiDAV direct", f"http://{c.HOST}:{dav_port}", args, lua,
                                     {"BENCH_PREFIX": f"d{stamp}"})
        before = proxy.metrics()
        rows["put undo-proxy"] = measure("PUT WsgiDAV via undo-proxy", proxy.url, args, lua,
                                         {"BENCH_PREFIX": f"p{stamp}"})
        after = proxy.metrics()
        batch = batch_stats(before, after)
        c.log(f"group commit during the PUT run: {batch[0]:.0f} commits, {batch[1]:.2f} writes/commit, "
              f"{batch[2]:.2f} ms/commit")
        c.Procs.stop(proxy.proc)

    # -------------------------------------------------------------------- report
    r = rows
    up_vs_mitm = r["nginx undo-proxy"].rps / r["nginx mitmdump"].rps
    up_vs_direct_dav = r["dav undo-proxy"].rps / r["dav direct"].rps
    put_ratio = r["put undo-proxy"].rps / r["put direct"].rps
    t1, t2 = up_vs_mitm >= 6, up_vs_direct_dav >= 0.9
    cmd = r["nginx direct"].command.rsplit(" ", 1)[0]
    body = f"""
wrk ({c.wrk_version()}), `{cmd} URL` per row after a {args.warmup}s warm-up; mitmproxy {c.mitm_version(mitmdump)}
(`mitmdump --mode reverse:http://127.0.0.1:PORT -w FILE -q`); undo-proxy `serve` with the SQLite timeline
(WAL, synchronous=FULL) and the blob store in a temp dir. All processes share the same 2 cores.

### GET of a 2 KiB file, nginx upstream

{c.WRK_TABLE_HEAD}
{r["nginx direct"].row("nginx direct", "1.00x direct")}
{r["nginx undo-proxy"].row("undo-proxy -> nginx",
                           f"{r['nginx undo-proxy'].rps / r['nginx direct'].rps:.2f}x direct, "
                           f"**{up_vs_mitm:.2f}x mitmdump**")}
{r["nginx mitmdump"].row("mitmdump -> nginx", f"{r['nginx mitmdump'].rps / r['nginx direct'].rps:.2f}x direct")}

### GET of a 2 KiB file, WsgiDAV upstream

{c.WRK_TABLE_HEAD}
{r["dav direct"].row("WsgiDAV direct", "1.00x direct")}
{r["dav undo-proxy"].row("undo-proxy -> WsgiDAV",
                         f"**{up_vs_direct_dav:.2f}x direct**, "
                         f"{r['dav undo-proxy'].rps / r['dav mitmdump'].rps:.2f}x mitmdump")}
{r["dav mitmdump"].row("mitmdump -> WsgiDAV", f"{r['dav mitmdump'].rps / r['dav direct'].rps:.2f}x direct")}

### Mutating: PUT of 2 KiB bodies to distinct new paths, WsgiDAV upstream

Each PUT through undo-proxy stores its body in the blob store (fsync), commits its intent before it is
forwarded and its outcome before the client is answered: two durable timeline writes per request, shared
between concurrent requests by the group committer.

{c.WRK_TABLE_HEAD}
{r["put direct"].row("PUT WsgiDAV direct", "1.00x direct")}
{r["put undo-proxy"].row("PUT undo-proxy -> WsgiDAV", f"{put_ratio:.2f}x direct")}

Group commit during the undo-proxy PUT run (from `/metrics`): {batch[0]:,.0f} commits,
**{batch[1]:.2f} writes per commit** on average
(`undo_proxy_timeline_commit_batch_size_sum / _count`), {batch[2]:.2f} ms per commit.

### Targets

| target | measured | result |
|---|---:|---|
| undo-proxy >= 6x mitmdump req/s (nginx) | {up_vs_mitm:.2f}x | {c.verdict(t1)} |
| undo-proxy >= 0.9x direct req/s (WsgiDAV) | {up_vs_direct_dav:.2f}x | {c.verdict(t2)} |
"""
    print(body)
    if not args.no_write:
        c.write_section("bench/http_overhead.py", body, c.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
