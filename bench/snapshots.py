#!/usr/bin/env python3
"""Snapshot time against volume size, btrfs vs copy, and the gate pause under load (issue 3, "Speed").

1. Volumes of 10 MB, 100 MB, 500 MB and 2 GB of files (1 MiB files of incompressible data, synced to disk
   before timing): a btrfs subvolume on a loop-mounted image (needs root) and a plain directory on the
   machine's own filesystem for the `copy` backend. Each take goes through storage/snapshots.py
   (`BtrfsBackend.take` / `CopyBackend.take`) and is deleted again before the next one; median and max of
   several takes per size. Target: btrfs median < 150 ms at every size.
2. Gate pause under load: `undo-proxy serve` on the btrfs volume (WsgiDAV upstream), a small asyncio
   client PUTting 2 KiB bodies to distinct paths, and snapshots taken through the admin API
   (POST /api/snapshots) during it; pause_ms / duration_ms read from each snapshot's JSON.

Usage (as root): /work/venv/bin/python bench/snapshots.py [--sizes 10,100,500,2000] [--takes 7]
       [--copy-takes 3] [--gate-snapshots 20] [--no-write] [--keep]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

sys.path.insert(0, str(c.ROOT))
from storage.snapshots import BtrfsBackend, CopyBackend, SnapshotBackend  # noqa: E402

MiB = 1024 * 1024


def fill_to(volume: Path, mb: int) -> int:
    """Add 1 MiB files (100 per directory) until the volume holds `mb` MiB; returns the file count."""
    have = sorted(volume.rglob("f*.bin"))
    n = len(have)
    block = os.urandom(MiB)
    while n < mb:
        d = volume / f"d{n // 100:04d}"
        d.mkdir(exist_ok=True)
        # Distinct content per file (no dedup, no compression helps) without generating 2 GB of randomness.
        (d / f"f{n:06d}.bin").write_bytes(n.to_bytes(8, "big") + block[8:])
        n += 1
    return n


def sync() -> None:
    subprocess.run(["sync"], check=True)


async def time_takes(backend: SnapshotBackend, takes: int, tag: str) -> list[float]:
    times = []
    for i in range(takes):
        sid = f"20000101T{int(tag):02d}00{i:02d}Z"
        t0 = time.perf_counter()
        await backend.take(sid)
        times.append((time.perf_counter() - t0) * 1000)
        await backend.delete(sid)
        sync()
    return times


# --------------------------------------------------------------------------- btrfs image

class BtrfsImage:
    def __init__(self, work: Path, size_gb: int) -> None:
        self.image = work / "btrfs.img"
        self.mount = work / "mnt"
        self.size = size_gb * 1024 * MiB

    def __enter__(self) -> "BtrfsImage":
        self.mount.mkdir()
        with open(self.image, "wb") as fh:
            fh.truncate(self.size)
        subprocess.run([c.tool("mkfs.btrfs"), "-q", str(self.image)], check=True)
        subprocess.run([c.tool("mount"), "-t", "btrfs", "-o", "loop", str(self.image), str(self.mount)], check=True)
        self.volume, self.store = self.mount / "vol", self.mount / "snaps"
        subprocess.run([c.tool("btrfs"), "subvolume", "create", str(self.volume)], check=True, capture_output=True)
        self.store.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([c.tool("umount"), "-l", str(self.mount)], check=False)
        self.image.unlink(missing_ok=True)


# --------------------------------------------------------------------------- gate pause under load

async def put_load(url: str, stop: asyncio.Event, concurrency: int, stats: dict) -> None:
    import aiohttp
    filler = b"0123456789abcdef" * 128

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = f"{w}-{n}\n".encode() + filler
            t0 = time.perf_counter()
            try:
                async with session.put(f"{url}/load/w{w}-{n}.txt", data=body[:2048]) as resp:
                    await resp.read()
                    stats["status"][resp.status] = stats["status"].get(resp.status, 0) + 1
            except aiohttp.ClientError as exc:
                stats["errors"].append(repr(exc))
                continue
            stats["lat"].append((time.perf_counter() - t0) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(w, session) for w in range(concurrency)))


async def gate_under_load(procs: c.Procs, work: Path, volume: Path, store: Path, backend: str, snapshots: int,
                          concurrency: int, interval: float) -> dict:
    (volume / "load").mkdir(exist_ok=True)
    dav_port = c.free_port()
    c.start_wsgidav(procs, volume, dav_port, work)
    proxy = c.UndoProxy(work / f"proxy-{backend}", f"http://{c.HOST}:{dav_port}", volume=volume, store=store,
                        backend=backend).start(procs)
    stop = asyncio.Event()
    stats: dict = {"lat": [], "errors": [], "status": {}}
    load = asyncio.create_task(put_load(proxy.url, stop, concurrency, stats))
    await asyncio.sleep(2)  # load running
    snaps = []
    t0 = time.perf_counter()
    for _ in range(snapshots):
        snaps.append(await asyncio.to_thread(proxy.api, "POST", "/api/snapshots", {"label": "bench"}))
        await asyncio.sleep(interval)
    elapsed = time.perf_counter() - t0
    n_before = len(stats["lat"])
    await asyncio.sleep(1)
    stop.set()
    await load
    c.Procs.stop(proxy.proc)
    verbs = sum(v for k, v in stats["status"].items())
    return {"backend": backend, "snaps": snaps, "lat": stats["lat"], "errors": stats["errors"],
            "status": stats["status"], "verbs": verbs, "elapsed": elapsed, "during": n_before}


# --------------------------------------------------------------------------- main

async def amain(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("run as root: the btrfs half loop-mounts an image")
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict[int, list[float]]] = {"btrfs": {}, "copy": {}}
    files: dict[int, int] = {}
    gate: list[dict] = []
    with c.workdir("undo-bench-snap-", args.keep) as work, c.Procs() as procs:
        img_gb = max(4, int(max(sizes) / 1024 * 2) + 2)
        with BtrfsImage(work, img_gb) as fs:
            btrfs = BtrfsBackend(fs.volume, fs.store)
            await btrfs.check()
            copy_vol, copy_store = work / "copy-vol", work / "copy-snaps"
            copy_vol.mkdir()
            copy = CopyBackend(copy_vol, copy_store)
            await copy.check()
            for i, mb in enumerate(sizes):
                c.log(f"filling both volumes to {mb} MB")
                files[mb] = fill_to(fs.volume, mb)
                fill_to(copy_vol, mb)
                sync()
                results["btrfs"][mb] = await time_takes(btrfs, args.takes, f"{10 + i}")
                c.log(f"btrfs {mb} MB: median {c.median(results['btrfs'][mb]):.1f} ms, "
                      f"max {max(results['btrfs'][mb]):.1f} ms")
                results["copy"][mb] = await time_takes(copy, args.copy_takes, f"{20 + i}")
                c.log(f"copy  {mb} MB: median {c.median(results['copy'][mb]):.0f} ms, "
                      f"max {max(results['copy'][mb]):.0f} ms")
            # The copy volume is no longer needed: free the disk before the load test.
            subprocess.run(["rm", "-rf", str(copy_vol), str(copy_store)], check=True)

            c.log(f"gate pause under PUT load: {args.gate_snapshots} btrfs snapshots via the admin API "
                  f"({max(sizes)} MB volume)")
            gate.append(await gate_under_load(procs, work, fs.volume, fs.store, "btrfs", args.gate_snapshots,
                                              args.concurrency, args.interval))
            c.Procs.close(procs)
        # The copy backend's pause under the same load, on a small volume (it grows with the volume).
        small_vol, small_store = work / "copy-small", work / "copy-small-snaps"
        small_vol.mkdir()
        fill_to(small_vol, args.copy_gate_mb)
        sync()
        c.log(f"gate pause under PUT load: {args.gate_snapshots} copy snapshots ({args.copy_gate_mb} MB volume)")
        gate.append(await gate_under_load(procs, work, small_vol, small_store, "copy", args.gate_snapshots,
                                          args.concurrency, args.interval))

    # ------------------------------------------------------------------ report
    def cell(v: list[float]) -> str:
        return f"{c.fmt_ms(c.median(v))} / {c.fmt_ms(max(v))}"

    lines = ["| volume | files | btrfs median / max ms | copy median / max ms | copy / btrfs (median) |",
             "|---:|---:|---:|---:|---:|"]
    for mb in sizes:
        b, cp = results["btrfs"][mb], results["copy"][mb]
        lines.append(f"| {mb:,} MB | {files[mb]:,} | {cell(b)} | {cell(cp)} | "
                     f"{c.median(cp) / c.median(b):,.0f}x |")
    worst = max(c.median(results["btrfs"][mb]) for mb in sizes)
    size_ok = worst < 150

    glines = ["| backend | volume | snapshots | pause p50 ms | pause p99 ms | pause max ms | take p50 ms | "
              "drain+flush p50 / max ms | PUTs during the run | PUT p50 / p99 ms | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g, vol in zip(gate, [f"{max(sizes):,} MB", f"{args.copy_gate_mb} MB"]):
        pauses = [s["pause_ms"] for s in g["snaps"]]
        takes = [s["duration_ms"] for s in g["snaps"]]
        drains = [s["pause_ms"] - s["duration_ms"] for s in g["snaps"]]
        non201 = sum(v for k, v in g["status"].items() if k not in (200, 201, 204))
        glines.append(f"| {g['backend']} | {vol} | {len(pauses)} | {c.fmt_ms(c.pct(pauses, 50))} | "
                      f"{c.fmt_ms(c.pct(pauses, 99))} | {c.fmt_ms(max(pauses))} | {c.fmt_ms(c.pct(takes, 50))} | "
                      f"{c.fmt_ms(c.pct(drains, 50))} / {c.fmt_ms(max(drains))} | "
                      f"{g['verbs']:,} | {c.fmt_ms(c.pct(g['lat'], 50))} / {c.fmt_ms(c.pct(g['lat'], 99))} | "
                      f"{len(g['errors']) + non201} |")
    bpause = [s["pause_ms"] for s in gate[0]["snaps"]]

    body = f"""
Snapshots through `storage/snapshots.py` directly (`BtrfsBackend.take`, `CopyBackend.take`). The btrfs
volume is a subvolume on a {img_gb} GiB loop-mounted image; the copy volume is a plain directory on the
machine's own filesystem (ext4 here, so `cp -a --reflink=auto` really copies). Data: 1 MiB files of
incompressible bytes, synced before timing; each snapshot is deleted (and synced) before the next take.
{args.takes} takes per size for btrfs, {args.copy_takes} for copy.

### Snapshot time against volume size

{chr(10).join(lines)}

btrfs target: median < 150 ms at every size: worst median {worst:.1f} ms, {c.verdict(size_ok)}.

### Gate pause under load

`undo-proxy serve` (WsgiDAV upstream serving the volume), {args.concurrency} concurrent asyncio clients
PUTting 2 KiB bodies to distinct paths; {args.gate_snapshots} snapshots taken with `POST /api/snapshots`
{args.interval}s apart during the load. "pause" is the snapshot's `pause_ms` (mutating traffic held:
draining in-flight verbs, flushing the timeline, taking the snapshot); "take" is its `duration_ms`;
"drain+flush" is the difference: waiting for the PUTs already in flight to finish (so it follows their
latency) and the timeline flush.

{chr(10).join(glines)}

btrfs gate pause p99 under load: **{c.pct(bpause, 99):.1f} ms** (max {max(bpause):.1f} ms).
"""
    print(body)
    if not args.no_write:
        c.write_section("bench/snapshots.py", body, c.command_line())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,500,2000", help="volume sizes in MB (ascending)")
    ap.add_argument("--takes", type=int, default=7, help="btrfs takes per size")
    ap.add_argument("--copy-takes", type=int, default=3, help="copy takes per size")
    ap.add_argument("--gate-snapshots", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=16, help="PUT clients during the gate test")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between gate-test snapshots")
    ap.add_argument("--copy-gate-mb", type=int, default=10, help="volume size for the copy gate test")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
