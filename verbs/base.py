"""The verb interface: what every verb pack defines (see ARCHITECTURE.md, "Verbs").

A pack turns a protocol request into an Intent (verb name, logical targets, mutates?, what to store),
says what of a response counts as the output, re-issues a recorded verb on replay, checks a replayed
output against the original and compensates an inconsistency.
"""
from __future__ import annotations

import importlib
import posixpath
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Intent:
    verb: str                 # "<pack>.<action>", e.g. "webdav.put"
    targets: list[str]        # logical names, never byte ranges or server-chosen ids
    mutates: bool
    summary: str              # one line for people: "PUT /notes/a.txt"
    request: dict[str, Any]   # JSON-able record of the request, bodies as blob digests


@dataclass
class RecordedVerb:
    """A verb as the timeline holds it (what replay, check and compensate receive)."""
    seq: int
    verb: str
    protocol: str
    frontend: str
    targets: list[str]
    mutates: bool
    status: str
    origin: str
    cycle: int | None
    original_seq: int | None
    summary: str
    request: dict[str, Any]
    output: dict[str, Any] | None
    time: str | None = None


@dataclass
class Finding:
    """A failed consistency check."""
    kind: str    # "output-changed" | "now-fails" | "now-succeeds" | pack-specific kinds
    detail: str


@dataclass
class ReplayResult:
    status: str               # "committed" if the upstream answered, else "failed"
    output: dict[str, Any]
    summary: str
    request: dict[str, Any]   # the request as re-issued (after name translation)
    targets: list[str] | None = None  # its logical targets, when translation changed them


@dataclass
class CompensationResult:
    state: str                # "done" | "failed" | "acknowledged" | "pending"
    detail: str = ""


@dataclass
class ReplayContext:
    """What a pack may use while replaying: its front-end's upstream client, the blob store and the
    cycle's name map (old server-chosen name -> new one)."""
    upstream: Any
    blobs: Any
    names: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class VerbPack(Protocol):
    name: str
    protocol: str

    def check(self, original: RecordedVerb, replayed_output: dict[str, Any]) -> Finding | None: ...

    async def replay(self, verb: RecordedVerb, ctx: ReplayContext) -> ReplayResult: ...

    async def compensate(self, inconsistency: dict[str, Any], verb: RecordedVerb,
                         frontend: Any) -> CompensationResult: ...

    def conflicts(self, a: list[str], b: list[str]) -> bool: ...


def paths_overlap(a: str, b: str) -> bool:
    """True when one path is the other or lies below it ("/d" and "/d/x"), so order matters."""
    if a == b:
        return True
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return long.startswith(short.rstrip("/") + "/")


def targets_conflict(a: list[str], b: list[str]) -> bool:
    return any(paths_overlap(x, y) for x in a for y in b)


def normalize_path(raw: str) -> str:
    """'/a/./b/../c//d/' -> '/a/c/d': the logical name of a resource, without its query."""
    path = raw.split("?", 1)[0].split("#", 1)[0] or "/"
    norm = posixpath.normpath("/" + path.lstrip("/"))
    return "/" if norm in ("/", "//") else norm.rstrip("/")


BUILTIN_PACKS = {
    "http": "verbs.http:HttpPack",
    "webdav": "verbs.webdav:WebdavPack",
    "smtp": "verbs.smtp:SmtpPack",
    "imap": "verbs.imap:ImapPack",
}


def pack_target(spec: str) -> str:
    """'webdav' or 'module.path:Pack' -> 'module.path:Pack', without importing anything (every command checks
    the config; only `serve` loads the packs). Raises ValueError with a readable reason."""
    target = BUILTIN_PACKS.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown verb pack {spec!r} (built in: {', '.join(sorted(BUILTIN_PACKS))})")
    return target


def load_pack(spec: str) -> Any:
    """'webdav' or 'module.path:Pack' -> a pack instance. Raises ValueError with a readable reason."""
    module_name, cls_name = pack_target(spec).split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, cls_name)()
    except AttributeError:
        raise ValueError(f"{module_name!r} has no {cls_name!r}") from None
