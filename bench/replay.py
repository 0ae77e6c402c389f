#!/usr/bin/env python3
"""Replay rate (issue 3, "Speed").

For each upstream, a fresh `undo-proxy serve` (copy snapshot backend, SQLite timeline, temp dir):
snapshot first (POST /api/snapshots), then record a timeline through the proxy, then rewind to the
snapshot (POST /api/rewind) and replay (POST /api/replay), timing the replay call.

- 20,000 verbs (10,000 PUTs of 2 KiB to distinct paths, each followed by a GET of the same path; 32 clients)
  against the fast upstream (bench/fast_upstream.py: a minimal aiohttp app answering 201/200 at once) and
  against WsgiDAV. Target: >= 2,000 verbs/s on the fast upstream.
- A timeline recorded at a steady 200 verbs/s (100 PUT+GET pairs a second, for --steady-seconds) on the
  fast upstream and on WsgiDAV; its replay time against its recorded wall time. Target: replay >= 10x faster.

Usage: /work/venv/bin/python bench/replay.py [--verbs 20000] [--steady-seconds 30] [--steady-rate 200] [--repeats 3]
       [--upstreams fast,wsgidav] [--no-write] [--keep]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

FILLER = b"0123456789abcdef" * 128  # 2 KiB


def body(i: int) -> bytes:
    head = f"verb {i}\n".encode()
    return head + FILLER[len(head):]


async def pair(session, url: str, i: int, stats: dict) -> None:
    """PUT /r/f{i}.txt then GET it back: two verbs."""
    import aiohttp
    path = f"{url}/r/f{i:06d}.txt"
    for method, data in (("PUT", body(i)), ("GET", None)):
        try:
            async with session.request(method, path, data=data) as resp:
                await resp.read()
                stats[resp.status] = stats.get(resp.status, 0) + 1
        except aiohttp.ClientError as exc:
            stats[repr(exc)] = stats.get(repr(exc), 0) + 1


async def record_burst(url: str, pairs: int, concurrency: int) -> tuple[float, dict]:
    import aiohttp
    stats: dict = {}
    queue = iter(range(pairs))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            await pair(session, url, i, stats)

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - t0, stats


async def record_steady(url: str, rate: float, seconds: float, in_flight: int = 32) -> tuple[float, dict, float]:
    """Start one PUT+GET pair every 2/rate seconds (so `rate` verbs a second). Returns the wall time from
    the first request to the last answer, the statuses, and the worst lag behind the schedule."""
    import aiohttp
    stats: dict = {}
    pairs = int(rate * seconds / 2)
    interval = 2 / rate
    tasks = []
    lag = 0.0
    # At most `in_flight` pairs at once: a service that cannot keep up shows as lag behind the schedule,
    # not as a pile of requests timing out.
    slots = asyncio.Semaphore(in_flight)

    async def paced(session: aiohttp.ClientSession, i: int) -> None:
        try:
            await pair(session, url, i, stats)
        finally:
            slots.release()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        for i in range(pairs):
            due = t0 + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            lag = max(lag, time.perf_counter() - due)
            tasks.append(asyncio.create_task(paced(session, i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return wall, stats, lag


async def settled_last_seq(proxy: c.UndoProxy, expected: int, timeout: float = 5.0) -> int:
    """The timeline's last seq once every answered request is on it: reads are written in batches that
    linger a few ms, so a status taken the instant the load ends may miss the last of them."""
    deadline = time.monotonic() + timeout
    while True:
        last_seq = (await asyncio.to_thread(proxy.api, "GET", "/api/status"))["last_seq"]
        if last_seq >= expected or time.monotonic() > deadline:
            return last_seq
        await asyncio.sleep(0.05)


def start_upstream(kind: str, procs: c.Procs, work: Path, volume: Path) -> str:
    port = c.free_port()
    if kind == "wsgidav":
        c.start_wsgidav(procs, volume, port, work)
    else:
        logf = work / f"fast-{port}.log"
        proc = procs.start([sys.executable, str(Path(__file__).with_name("fast_upstream.py")), str(port)], logf)
        c.wait_port(port, proc, logfile=logf)
    return f"http://{c.HOST}:{port}"


async def scenario(kind: str, mode: str, args: argparse.Namespace, work: Path) -> dict:
    """mode: 'burst' (args.verbs verbs, as fast as the clients go) or 'steady'."""
    sdir = work / f"{kind}-{mode}"
    volume, store = sdir / "volume", sdir / "snaps"
    (volume / "r").mkdir(parents=True)
    store.mkdir()
    with c.Procs() as procs:
        upstream = start_upstream(kind, procs, sdir, volume)
        proxy = c.UndoProxy(sdir / "proxy", upstream, volume=volume, store=store, backend="copy").start(procs)
        snap = await asyncio.to_thread(proxy.api, "POST", "/api/snapshots", {"label": "before the timeline"})
        if mode == "burst":
            c.log(f"{kind}: recording {args.verbs:,} verbs ({args.concurrency} clients)")
            wall, stats = await record_burst(proxy.url, args.verbs // 2, args.concurrency)
            lag = 0.0
        else:
            c.log(f"{kind}: recording at a steady {args.steady_rate:.0f} verbs/s for {args.steady_seconds}s")
            wall, stats, lag = await record_steady(proxy.url, args.steady_rate, args.steady_seconds,
                                                   args.concurrency)
        recorded = await settled_last_seq(proxy, sum(stats.values()))
        c.log(f"{kind} {mode}: recorded {recorded:,} verbs in {wall:.1f}s ({recorded / wall:,.0f}/s), "
              f"statuses {stats}")
        # The same timeline is replayed `repeats` times (rewind, replay, cancel): this machine's speed
        # drifts by a quarter from minute to minute, and the median of several replays says more than one.
        replays: list[float] = []
        for attempt in range(args.repeats):
            if attempt:
                await asyncio.to_thread(proxy.api, "POST", "/api/cancel")
            t0 = time.perf_counter()
            cycle = await asyncio.to_thread(proxy.api, "POST", "/api/rewind", {"to": snap["id"]})
            rewind_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cycle = await asyncio.to_thread(proxy.api, "POST", "/api/replay", {"skip": []})
            replays.append(time.perf_counter() - t0)
            c.log(f"{kind} {mode}: replayed {cycle['replayed']:,} verbs in {replays[-1]:.1f}s "
                  f"({cycle['replayed'] / replays[-1]:,.0f}/s), {cycle['inconsistencies']} inconsistencies, "
                  f"state {cycle['state']}")
        replay_s = c.median(replays)
        metrics = await asyncio.to_thread(proxy.metrics)
        c.Procs.stop(proxy.proc)
    return {"kind": kind, "mode": mode, "recorded": recorded, "wall": wall, "stats": stats, "lag": lag,
            "rewind_s": rewind_s, "replay_s": replay_s, "replays": replays, "replayed": cycle["replayed"],
            "inconsistencies": cycle["inconsistencies"], "state": cycle["state"],
            "batch": metrics.get("undo_proxy_timeline_commit_batch_size_sum", 0)
            / max(1.0, metrics.get("undo_proxy_timeline_commit_batch_size_count", 0))}


async def amain(args: argparse.Namespace) -> int:
    kinds = args.upstreams.split(",")
    runs: list[dict] = []
    with c.workdir("undo-bench-replay-", args.keep) as work:
        for kind in kinds:
            runs.append(await scenario(kind, "burst", args, work))
        for kind in kinds:
            runs.append(await scenario(kind, "steady", args, work))

    names = {"fast": "fast upstream (aiohttp, 201/200 at once)", "wsgidav": "WsgiDAV"}
    lines = ["| upstream | timeline | recorded in | statuses while recording | replayed | replay time | "
             "replay rate (median) | rewind | inconsistencies |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        what = (f"{r['recorded']:,} verbs, burst" if r["mode"] == "burst"
                else f"{r['recorded']:,} verbs, steady {args.steady_rate:.0f}/s scheduled")
        lines.append(f"| {names.get(r['kind'], r['kind'])} | {what} | {r['wall']:.1f} s "
                     f"({r['recorded'] / r['wall']:,.0f}/s) | "
                     f"{', '.join(f'{k}: {v:,}' for k, v in sorted(r['stats'].items(), key=str))} | "
                     f"{r['replayed']:,} | {r['replay_s']:.1f} s ({', '.join(f'{x:.1f}' for x in r['replays'])}) | "
                     f"**{r['replayed'] / r['replay_s']:,.0f} verbs/s** | {r['rewind_s']:.2f} s | "
                     f"{r['inconsistencies']} |")
    targets = ["| target | measured | result |", "|---|---:|---|"]
    fast_burst = next((r for r in runs if r["kind"] == "fast" and r["mode"] == "burst"), None)
    if fast_burst:
        rate = fast_burst["replayed"] / fast_burst["replay_s"]
        targets.append(f"| >= 2,000 verbs/s replaying {fast_burst['recorded']:,} verbs on the fast upstream | "
                       f"{rate:,.0f} verbs/s | {c.verdict(rate >= 2000)} |")
    for r in runs:
        if r["mode"] == "steady":
            ratio = r["wall"] / r["replay_s"]
            targets.append(f"| replay >= 10x faster than recorded ({args.steady_rate:.0f} verbs/s, "
                           f"{names.get(r['kind'], r['kind'])}) | {ratio:.1f}x ({r['wall']:.1f} s recorded, "
                           f"{r['replay_s']:.1f} s replayed) | {c.verdict(ratio >= 10)} |")
    steady_lag = max((r["lag"] for r in runs if r["mode"] == "steady"), default=0.0)
    body = f"""
Each row is a fresh `undo-proxy serve` (SQLite timeline, `copy` snapshot backend, temp dir). The timeline
is recorded through the proxy: PUTs of distinct 2 KiB bodies to distinct paths `/r/fNNNNNN.txt`, each
followed by a GET of the same path (half the verbs mutate). A snapshot is taken before recording; then
`POST /api/rewind {{"to": snapshot}}` and `POST /api/replay` (timed: it returns when the replay is done and
the cycle is in review). Burst timelines are recorded by {args.concurrency} concurrent clients; steady ones
start one PUT+GET pair every {2 / args.steady_rate * 1000:.0f} ms, at most {args.concurrency} pairs in flight (worst lag
behind that schedule: {steady_lag * 1000:.0f} ms; "recorded in" shows the rate achieved). Replay runs verbs with disjoint targets concurrently (up to 32 at once) and
checks every output; "inconsistencies" should be 0 here. Each timeline is replayed {args.repeats} times (rewind,
replay, cancel, ...): "replay time" is the median, the single replays in brackets.

{chr(10).join(lines)}

### Targets

{chr(10).join(targets)}
"""
    print(body)
    if not args.no_write:
        c.write_section("bench/replay.py", body, c.command_line())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--verbs", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--steady-seconds", type=float, default=30)
    ap.add_argument("--steady-rate", type=float, default=200)
    ap.add_argument("--upstreams", default="fast,wsgidav")
    ap.add_argument("--repeats", type=int, default=3, help="replays of each timeline (the median is reported)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
