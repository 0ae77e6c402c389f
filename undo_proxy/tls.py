"""TLS for the front-ends that offer STARTTLS."""
from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server-side context from a certificate chain and key, or None when TLS is not configured."""
    if not cert or not key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
