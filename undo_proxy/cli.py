"""The `undo-proxy` command. Exit codes: 0 success, 1 the operation failed, 2 usage or configuration
error, 3 the daemon is not reachable. `--json` prints one JSON document on stdout and nothing else there."""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from storage.db import TimelineUnavailable
from undo_proxy.config import Config, ConfigError, find_config_path, load_config, sample_config

# Off a terminal (pipes, logs) rich would wrap tables at 80 columns; operators grep these lines.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


class Exit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code, self.message = code, message


def whole_number(text: str) -> int:
    """A count, verb number or id: 0 up to 2**63 - 1 (argparse's usage error, exit 2, for anything else)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    if value >= 1 << 63:   # beyond any database's integers
        raise argparse.ArgumentTypeError(f"{text} is too large")
    return value


def die(code: int, message: str) -> NoReturn:
    raise Exit(code, message)


# --- talking to the daemon --------------------------------------------------------------------------
def admin_request(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None) -> urllib.request.Request:
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.Request(f"http://{cfg.admin.listen}{path}", data=data, method=method,
                                  headers={"Authorization": f"Bearer {cfg.admin.token}",
                                           "Content-Type": "application/json"})


def api(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None,
        timeout: float | None = 600) -> Any:
    try:
        with urllib.request.urlopen(admin_request(cfg, method, path, body), timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = str(exc.reason)
        die(2 if exc.code == 400 else 1, message)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        die(3, f"the undo-proxy daemon is not reachable at {cfg.admin.listen} ({reason}); is `undo-proxy serve` running?")


def timeline_store(cfg: Config):  # noqa: ANN201
    from storage.timeline import Timeline
    tl = Timeline(cfg.timeline_url)
    try:
        tl.check_schema()
    except TimelineUnavailable as exc:
        die(1, str(exc))
    return tl


# --- output -----------------------------------------------------------------------------------------
def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def verbs_table(verbs: list[dict[str, Any]]) -> Table:
    t = Table(box=None, pad_edge=False)
    for col in ("seq", "time", "verb", "status", "origin"):
        t.add_column(col, no_wrap=True)
    t.add_column("summary", overflow="fold")
    for v in verbs:
        origin = v["origin"] if v["origin"] == "live" else f"replay of {v['original_seq']} (cycle {v['cycle']})"
        t.add_row(str(v["seq"]), v["time"][:23], v["verb"], v["status"], origin, v["summary"], style=None)
    return t


def cycle_line(c: dict[str, Any]) -> str:
    skipped = ",".join(map(str, c["skipped"])) or "none"
    return (f"cycle {c['id']}: {c['state']}; rewound to snapshot {c['snapshot']} (state after verb "
            f"{c['rewind_to_seq']}); skipped {skipped}; replayed {c['replayed']}; "
            f"inconsistencies {c['inconsistencies']}")


# --- commands ---------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> None:
    directory = Path(args.dir or ".")
    target = directory / "undo-proxy.toml"
    if target.exists():
        die(1, f"{target} exists already; not overwriting it")
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "snapshots"):
        (directory / sub).mkdir(exist_ok=True)
    (directory / "state").mkdir(exist_ok=True, mode=0o700)
    target.write_text(sample_config(directory, secrets.token_urlsafe(24)))
    target.chmod(0o600)
    sys.stderr.write(f"wrote {target}; next: undo-proxy -c {target} db upgrade && undo-proxy -c {target} serve\n")


def cmd_db_upgrade(args: argparse.Namespace, cfg: Config) -> None:
    from storage.db import upgrade
    try:
        rev = upgrade(cfg.timeline_url)
    except Exception as exc:  # noqa: BLE001 - any database failure is reported in one line
        die(1, f"db upgrade failed: {str(getattr(exc, 'orig', exc)).splitlines()[0]}")
    err.print(f"timeline schema at revision {rev}")


def cmd_serve(args: argparse.Namespace, cfg: Config) -> None:
    from undo_proxy.daemon import StartupError, run
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        run(cfg)
    except (StartupError, TimelineUnavailable) as exc:
        die(1, str(exc))


def daemon_state(cfg: Config) -> str:
    """'running' when the daemon's admin API answers, else 'not running' (status reads the timeline itself,
    so it says which it is: a stopped daemon records nothing)."""
    try:
        with urllib.request.urlopen(admin_request(cfg, "GET", "/api/status"), timeout=2):
            return "running"
    except urllib.error.HTTPError:
        return "running"   # it answered (a token from another config, say)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return "not running"


def cmd_status(args: argparse.Namespace, cfg: Config) -> None:
    doc = {**timeline_store(cfg).status(), "daemon": daemon_state(cfg)}
    if args.json:
        return emit_json(doc)
    out.print(f"mode: {doc['mode']}" + (f" (cycle {doc['cycle']}, {doc['cycle_state']})" if doc["cycle"] else ""))
    out.print(f"last verb: {doc['last_seq']}  snapshots: {doc['snapshots']}")
    out.print("daemon: running" if doc["daemon"] == "running" else
              f"daemon: not running (nothing answers at {cfg.admin.listen}): nothing is proxied or recorded")


def cmd_timeline(args: argparse.Namespace, cfg: Config) -> None:
    from storage.timeline import VerbFilter
    verbs = timeline_store(cfg).verbs(VerbFilter(limit=args.limit, after=args.after, protocol=args.protocol,
                                                 verb=args.verb, target=args.target, cycle=args.cycle))
    if args.json:
        return emit_json(verbs)
    out.print(verbs_table(verbs))


def cmd_show(args: argparse.Namespace, cfg: Config) -> None:
    doc = timeline_store(cfg).verb(args.seq)
    if doc is None:
        die(1, f"no verb {args.seq}")
    if args.json:
        return emit_json(doc)
    out.print(verbs_table([doc]))
    out.print_json(json.dumps({"request": doc["request"], "output": doc["output"]}))


def cmd_snapshot(args: argparse.Namespace, cfg: Config) -> None:
    if args.action == "take":
        doc = api(cfg, "POST", "/api/snapshots", {"label": args.label})
        if args.json:
            return emit_json(doc)
        out.print(f"snapshot {doc['id']} after verb {doc['after_seq']} ({doc['backend']}, "
                  f"{doc['duration_ms']} ms; traffic held {doc['pause_ms']} ms)")
    elif args.action == "list":
        snaps = timeline_store(cfg).snapshots()
        if args.json:
            return emit_json(snaps)
        t = Table(box=None, pad_edge=False)
        for col in ("id", "time", "after_seq", "kind", "label", "backend", "rewind point"):
            t.add_column(col, no_wrap=col != "label")
        for s in snaps:
            usable = "yes" if s["valid"] else "no"
            if s["valid"] and not Path(s["path"]).exists():
                usable = "no: missing from the store"
            t.add_row(s["id"], s["time"][:19], str(s["after_seq"]), s["kind"], s["label"] or "", s["backend"], usable)
        out.print(t)
    else:
        if not args.id.strip():
            die(2, "name the snapshot to delete: its id, or its label")
        api(cfg, "DELETE", f"/api/snapshots/{urllib.request.quote(args.id, safe='')}")
        err.print(f"deleted snapshot {args.id}")


def cmd_rewind(args: argparse.Namespace, cfg: Config) -> None:
    to = args.to.strip()
    if not to or (to.startswith("@") and not to[1:].isdigit()):   # malformed whether the daemon runs or not
        die(2, f"--to {args.to!r}: give a snapshot id or label, @SEQ (a verb number, e.g. @42) or an ISO-8601 time")
    if not args.yes:
        if not sys.stdin.isatty():
            die(2, "rewind stops live traffic and rolls the service back: confirm with --yes")
        answer = input(f"Rewind the service to {args.to}? Live traffic is refused until commit or cancel. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            die(1, "not rewound")
    doc = api(cfg, "POST", "/api/rewind", {"to": args.to}, timeout=None)
    emit_json(doc) if args.json else out.print(cycle_line(doc))


def cmd_repair(args: argparse.Namespace, cfg: Config) -> None:
    doc = api(cfg, "POST", "/api/repair", {"note": args.note})
    emit_json(doc) if args.json else out.print(cycle_line(doc))


def cmd_replay(args: argparse.Namespace, cfg: Config) -> None:
    skip = []
    for part in (args.skip or "").split(","):
        if part.strip():
            if not part.strip().isdigit():
                die(2, f"--skip takes verb numbers separated by commas, not {part!r}")
            skip.append(int(part))
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["doc"] = api(cfg, "POST", "/api/replay", {"skip": skip}, timeout=None)
        except Exit as exc:
            result["exit"] = exc

    worker = threading.Thread(target=call, daemon=True)
    status = api(cfg, "GET", "/api/status")
    worker.start()
    if err.is_terminal and status.get("cycle"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("replaying", total=None)
            while worker.is_alive():
                c = api(cfg, "GET", f"/api/cycles/{status['cycle']}")
                bar.update(task, completed=c["replayed"], total=c["to_replay"] or None)
                worker.join(0.3)
    worker.join()
    if "exit" in result:
        raise result["exit"]
    doc = result["doc"]
    emit_json(doc) if args.json else out.print(cycle_line(doc))


def cmd_commit(args: argparse.Namespace, cfg: Config) -> None:
    doc = api(cfg, "POST", "/api/commit", {})
    if args.json:
        return emit_json(doc)
    out.print(cycle_line(doc))
    pending = [i for i in api(cfg, "GET", f"/api/inconsistencies?cycle={doc['id']}")
               if i["compensation"] in ("pending", "failed")]
    if pending:
        out.print(f"{len(pending)} inconsistencies await compensation: undo-proxy compensate --all")


def cmd_cancel(args: argparse.Namespace, cfg: Config) -> None:
    doc = api(cfg, "POST", "/api/cancel", {}, timeout=None)
    emit_json(doc) if args.json else out.print(cycle_line(doc))


def cmd_inconsistencies(args: argparse.Namespace, cfg: Config) -> None:
    items = timeline_store(cfg).inconsistencies(cycle=args.cycle)
    if args.json:
        return emit_json(items)
    t = Table(box=None, pad_edge=False)
    for col in ("id", "cycle", "seq", "verb", "kind", "compensation", "detail"):
        t.add_column(col, overflow="fold")
    for i in items:
        t.add_row(str(i["id"]), str(i["cycle"]), str(i["seq"]), i["verb"], i["kind"], i["compensation"], i["detail"])
    out.print(t)


def cmd_compensate(args: argparse.Namespace, cfg: Config) -> None:
    if not args.ids and not args.all:
        die(2, "name inconsistency ids, or --all")
    items = api(cfg, "POST", "/api/compensate", {"ids": args.ids} if args.ids else {"all": True}, timeout=None)
    if args.json:
        emit_json(items)  # and still exit 1 below when one failed
    else:
        for i in items:
            detail = i.get("compensation_detail")
            out.print(f"inconsistency {i['id']} (verb {i['seq']}): {i['compensation']}" + (f": {detail}" if detail else ""))
    if any(i["compensation"] == "failed" for i in items):
        die(1, "some compensations failed; run `compensate` again to retry them")


# --- argument parsing -------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="config file (default: $UNDO_PROXY_CONFIG, else ./undo-proxy.toml)")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    p = argparse.ArgumentParser(prog="undo-proxy", parents=[common],
                                description="Rewind, repair, replay: an undo button for mail and web services.",
                                epilog="Exit codes: 0 success, 1 the operation failed, 2 usage or configuration "
                                       "error, 3 the daemon is not reachable.")
    p.add_argument("--version", action="version", version=f"undo-proxy {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=list(parents), help=summary, description=summary)

    s = command("init", "write a commented sample config, with data/, snapshots/ and state/ beside it")
    s.add_argument("dir", nargs="?", help="where to write undo-proxy.toml (default: the current directory)")
    s = command("db", "create or upgrade the timeline schema (Alembic)", common)
    s.add_argument("action", choices=["upgrade"])
    s = command("serve", "run every front-end, the admin API and UI, and the snapshot scheduler", common)
    s.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    command("status", "mode, open cycle, last verb, snapshot count (works with the daemon stopped)", common, js)
    s = command("timeline", "list verbs, oldest first (works with the daemon stopped)", common, js)
    s.add_argument("--limit", type=whole_number, metavar="N", help="at most N verbs")
    s.add_argument("--after", type=whole_number, metavar="SEQ", help="only verbs after SEQ")
    s.add_argument("--protocol", metavar="P", help="http, smtp or imap")
    s.add_argument("--verb", metavar="NAME", help="e.g. webdav.put, smtp.deliver")
    s.add_argument("--target", metavar="GLOB", help="shell-style pattern matched against each target, e.g. '/docs/*'")
    s.add_argument("--cycle", type=whole_number, metavar="ID", help="only the verbs replayed in cycle ID")
    s = command("show", "one verb with its recorded request and output", common, js)
    s.add_argument("seq", type=whole_number)
    s = command("snapshot", "take, list or delete snapshots", common)
    snap = s.add_subparsers(dest="action", required=True, metavar="{take,list,delete}")
    t = snap.add_parser("take", parents=[common, js], help="snapshot now, at a verb boundary",
                        description="snapshot now, at a verb boundary (through the daemon)")
    t.add_argument("--label", help="a note kept with the snapshot")
    snap.add_parser("list", parents=[common, js], help="snapshots, oldest first", description="snapshots, oldest first")
    d = snap.add_parser("delete", parents=[common], help="delete one snapshot", description="delete one snapshot")
    d.add_argument("id", help="a snapshot ID, or the label of exactly one snapshot")
    s = command("rewind", "open an undo cycle: put the service's state back to a point in its history", common, js)
    s.add_argument("--to", required=True, metavar="TARGET",
                   help="a snapshot ID or label, @SEQ (the state right after verb SEQ) or an ISO-8601 time")
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s = command("repair", "record what you repaired (the repair itself is yours to do)", common, js)
    s.add_argument("--note", required=True, help="what was repaired, for the record")
    s = command("replay", "replay every recorded verb after the rewind point through the repaired service",
                common, js)
    s.add_argument("--skip", metavar="SEQ,...", help="verbs not to replay (the bad ones), e.g. 18,19")
    command("commit", "accept the replayed history; live traffic resumes", common, js)
    command("cancel", "abandon the cycle: the pre-rewind state comes back exactly; live traffic resumes",
            common, js)
    s = command("inconsistencies", "what clients saw that the replayed history contradicts", common, js)
    s.add_argument("--cycle", type=whole_number, metavar="ID", help="only those of cycle ID")
    s = command("compensate", "run the compensation of inconsistencies (webhook, mail, or acknowledgement)",
                common, js)
    s.add_argument("ids", nargs="*", type=whole_number, metavar="ID", help="inconsistency ids")
    s.add_argument("--all", action="store_true", help="every pending one of cycles in review or committed")
    s = command("demo", "the self-contained showcase: a whole undo cycle on real backends, verified")
    s.add_argument("--workdir", metavar="DIR", help="an empty or new directory (default: a temporary one)")
    s.add_argument("--keep", action="store_true", help="leave everything running at the end")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("undo-proxy")
    except PackageNotFoundError:
        return "unknown"


COMMANDS = {"db": cmd_db_upgrade, "serve": cmd_serve, "status": cmd_status, "timeline": cmd_timeline,
            "show": cmd_show, "snapshot": cmd_snapshot, "rewind": cmd_rewind, "repair": cmd_repair,
            "replay": cmd_replay, "commit": cmd_commit, "cancel": cmd_cancel,
            "inconsistencies": cmd_inconsistencies, "compensate": cmd_compensate}


def fail(code: int, message: str) -> int:
    """Errors are one unwrapped line on stderr, whatever the terminal's width."""
    if message:
        sys.stderr.write(f"undo-proxy: {' '.join(message.split())}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "init":
            cmd_init(args)
            return 0
        if args.command == "demo":
            from undo_proxy.demo import DemoError, run_demo
            try:
                return run_demo(args.workdir, args.keep)
            except DemoError as exc:
                die(1, f"demo: {exc}")
        try:
            cfg = load_config(find_config_path(getattr(args, "config", None)))
        except ConfigError as exc:
            die(2, str(exc))
        COMMANDS[args.command](args, cfg)
        return 0
    except ConfigError as exc:
        return fail(2, str(exc))
    except Exit as exc:
        return fail(exc.code, exc.message)
    except TimelineUnavailable as exc:
        return fail(1, f"the timeline database is unavailable: {exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
