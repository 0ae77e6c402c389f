"""The `webdav` verb pack: HTTP plus WebDAV's methods (RFC 4918). PROPFIND reads; COPY and MOVE have the
Destination as a second target; LOCK's token is a server-chosen name, translated on replay; PROPFIND
bodies are compared without their volatile properties (dates, ETags, lock tokens)."""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from typing import Any

from verbs.base import Intent
from verbs.http import HttpPack, HttpRequestHead, header

DAV_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"})
VOLATILE_PROPS = frozenset({"getlastmodified", "creationdate", "getetag", "lockdiscovery",
                            "supportedlock", "quota-used-bytes", "quota-available-bytes"})


def normalized_multistatus(body: bytes) -> bytes | None:
    """A 207 body with volatile properties removed and responses sorted, or None if it is not XML."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for parent in root.iter():
        for child in list(parent):
            if child.tag.rsplit("}", 1)[-1] in VOLATILE_PROPS:
                parent.remove(child)
    responses = sorted((ET.tostring(r) for r in root), key=bytes)
    return b"\n".join(responses)


class WebdavPack(HttpPack):
    name = "webdav"

    def mutates(self, method: str) -> bool:
        return method not in DAV_READ_METHODS

    def targets(self, head: HttpRequestHead) -> list[str]:
        targets = [self.logical_path(head.raw_path)]
        if head.method.upper() in ("COPY", "MOVE"):
            destination = header(head.headers, "destination")
            if destination:
                second = self.logical_path(destination)
                if second not in targets:
                    targets.append(second)
        return targets

    def parse(self, head: HttpRequestHead) -> Intent:
        intent = super().parse(head)
        if len(intent.targets) > 1:  # COPY and MOVE say where to: "MOVE /a.txt → /dir/b.txt"
            intent.summary = f"{intent.summary} → {intent.targets[1]}"
        return intent

    def output(self, status: int, reason: str, headers: list[tuple[str, str]], body_digest: str,
               body_size: int, body_stored: bool, method: str, body: bytes | None = None) -> dict[str, Any]:
        out = super().output(status, reason, headers, body_digest, body_size, body_stored, method)
        token = header(headers, "lock-token")
        if token:
            out["lock_token"] = token.strip().strip("<>")
        if status == 207 and body is not None:
            normalized = normalized_multistatus(body)
            if normalized is not None:
                out["check_digest"] = hashlib.sha256(normalized).hexdigest()
        return out
