"""`undo-proxy serve`: every configured front-end, the admin listener and the snapshot scheduler in one
asyncio process."""
from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import resource
import signal
import socket
import ssl
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from aiohttp import web

from storage.blobs import BlobStore
from storage.snapshots import SnapshotError, make_backend
from storage.timeline import GroupCommitter, Timeline
from undo_proxy import metrics
from undo_proxy.admin import AdminApi, make_admin_app
from undo_proxy.config import Config, ConfigError
from undo_proxy.gate import Gate
from undo_proxy.http_proxy import HttpFrontendServer
from undo_proxy.http_upstream import HttpUpstream
from undo_proxy.imap_proxy import ImapFrontendServer
from undo_proxy.imap_upstream import ImapUpstream
from undo_proxy.manager import Frontend, UndoManager
from undo_proxy.smtp_proxy import SmtpFrontendServer
from undo_proxy.smtp_upstream import SmtpUpstream, XclientMissing
from verbs.base import load_pack

log = logging.getLogger("undo_proxy")
GC_FIRST_GENERATION = 20_000  # CPython default: 700


class StartupError(Exception):
    """The daemon cannot start; the message names what to fix."""


def load_packs(cfg: Config) -> dict[str, Any]:
    packs = {}
    for table, fe in cfg.frontends():
        try:
            packs[fe.name] = load_pack(fe.verbs)
        except ValueError as exc:
            raise ConfigError(f"{cfg.path}: {table}.verbs: {exc}") from None
    return packs


def cannot_listen(cfg: Config, key: str, listen: Any, exc: OSError) -> Exception:
    """A name that does not resolve is the config's fault (exit 2); a port in use is the machine's (exit 1)."""
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"{cfg.path}: {key}: cannot resolve the host of {listen}: {exc.strerror}")
    return StartupError(f"{key}: cannot listen on {listen}: {exc.strerror}")


def lock_state_dir(cfg: Config) -> int:
    cfg.state.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(cfg.state.dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another undo-proxy is running on {cfg.state.dir} (lock held)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def raise_open_files_limit() -> None:
    """Every client connection, upstream connection and blob file is a file descriptor: the soft limit
    (1,024 under many service managers) would turn a busy hour into refused connections and a timeline that
    cannot open its files. It is raised to the hard limit, as nginx and Go's runtime do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel still caps it at fs.nr_open
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("open files: cannot raise the soft limit of %d to %d: %s", soft, target, exc)
        else:
            log.info("open files: soft limit raised from %d to %d", soft, target)


def run(cfg: Config) -> None:
    """Serve until a signal stops the daemon; on uvloop where it is installed (a third less CPU per request)."""
    raise_open_files_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))


def settle_garbage_collector() -> None:
    """Everything made at start-up lives as long as the daemon: frozen, the collector no longer walks it on
    every full collection. Requests make short-lived containers by the thousand: a larger first generation
    collects them in fewer, cheaper passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_FIRST_GENERATION, *gc.get_threshold()[1:])


async def serve(cfg: Config) -> None:
    if not cfg.admin.token:
        raise ConfigError(f"{cfg.path}: admin.token: required to serve (or admin.token_file)")
    packs = load_packs(cfg)
    lock_fd = lock_state_dir(cfg)
    timeline = Timeline(cfg.timeline_url)
    await asyncio.to_thread(timeline.check_schema)
    blobs = BlobStore(cfg.blob_dir)
    backend = None
    if cfg.snapshots.volume and cfg.snapshots.store:
        if not cfg.snapshots.volume.is_dir():
            raise ConfigError(f"{cfg.path}: snapshots.volume: {cfg.snapshots.volume} does not exist (the service's "
                              f"data belongs there)")
        try:
            backend = await make_backend(cfg.snapshots.backend, cfg.snapshots.volume, cfg.snapshots.store)
        except SnapshotError as exc:
            raise StartupError(f"snapshots: {exc}") from None
        log.info("snapshots: %s backend, volume %s, store %s", backend.name, backend.volume, backend.store)
    gate = Gate()
    committer = GroupCommitter(timeline)

    def on_commit(batch: int, seconds: float, ok: bool) -> None:
        metrics.COMMIT_BATCH.observe(batch)
        metrics.COMMIT_SECONDS.observe(seconds)
        metrics.TIMELINE_UP.set(1 if ok else 0)
    committer.on_commit = on_commit
    committer.start()
    metrics.TIMELINE_UP.set(1)

    async with AsyncExitStack() as stack:
        stack.push_async_callback(asyncio.to_thread, timeline.close)
        stack.push_async_callback(committer.stop)
        frontends: dict[str, Frontend] = {}
        servers: list[HttpFrontendServer] = []
        for fe_cfg in cfg.http:
            upstream = HttpUpstream(fe_cfg.upstream, fe_cfg.timeout)
            await upstream.start()
            stack.push_async_callback(upstream.close)
            frontends[fe_cfg.name] = Frontend(fe_cfg.name, packs[fe_cfg.name], upstream, fe_cfg)
            servers.append(HttpFrontendServer(fe_cfg, packs[fe_cfg.name], gate, timeline, committer, blobs,
                                              upstream))
        smtp_servers: list[SmtpFrontendServer] = []
        for fe_smtp in cfg.smtp:
            smtp_upstream = SmtpUpstream(fe_smtp.upstream.host, fe_smtp.upstream.port, fe_smtp.timeout,
                                         fe_smtp.hostname, require_xclient=not fe_smtp.allow_without_xclient)
            try:
                await smtp_upstream.start()
            except XclientMissing as exc:
                raise StartupError(f"smtp {fe_smtp.name}: {exc}") from None
            frontends[fe_smtp.name] = Frontend(fe_smtp.name, packs[fe_smtp.name], smtp_upstream, fe_smtp)
            smtp_servers.append(SmtpFrontendServer(fe_smtp, packs[fe_smtp.name], gate, committer, blobs,
                                                   smtp_upstream))
        imap_servers: list[ImapFrontendServer] = []
        for fe_imap in cfg.imap:
            password = None
            if fe_imap.master_password_file:
                try:
                    password = fe_imap.master_password_file.read_text().strip()
                except OSError as exc:
                    raise StartupError(f"imap {fe_imap.name}: cannot read master_password_file "
                                       f"{fe_imap.master_password_file}: {exc.strerror}") from None
            imap_upstream = ImapUpstream(fe_imap.upstream.host, fe_imap.upstream.port, fe_imap.timeout,
                                         fe_imap.master_user, password, fe_imap.master_separator)
            frontends[fe_imap.name] = Frontend(fe_imap.name, packs[fe_imap.name], imap_upstream, fe_imap)
            try:
                imap_servers.append(ImapFrontendServer(fe_imap, packs[fe_imap.name], gate, committer, blobs,
                                                       imap_upstream))
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"imap {fe_imap.name}: cannot load tls_cert/tls_key: {exc}") from None
        manager = UndoManager(cfg, timeline, committer, gate, blobs, backend, frontends)
        await manager.recover()
        gate.on_mutation = manager.note_mutation
        table_of = {id(fe): table for table, fe in cfg.frontends()}
        for server in [*servers, *smtp_servers, *imap_servers]:
            try:
                await server.start()
            except OSError as exc:
                raise cannot_listen(cfg, f"{table_of[id(server.cfg)]}.listen", server.cfg.listen, exc) from None
            stack.push_async_callback(server.stop)

        admin_runner = web.AppRunner(make_admin_app(AdminApi(manager, cfg.admin.token)), access_log=None)
        await admin_runner.setup()
        stack.push_async_callback(admin_runner.cleanup)
        try:
            await web.TCPSite(admin_runner, cfg.admin.listen.host, cfg.admin.listen.port,
                              reuse_address=True).start()
        except OSError as exc:
            raise cannot_listen(cfg, "admin.listen", cfg.admin.listen, exc) from None
        log.info("admin API on http://%s/api", cfg.admin.listen)

        scheduler = asyncio.create_task(manager.scheduler(), name="snapshot-scheduler")
        stack.callback(scheduler.cancel)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        settle_garbage_collector()
        log.info("undo-proxy serving (mode %s)", gate.mode)
        await stop.wait()
        log.info("stopping")
    os.close(lock_fd)
