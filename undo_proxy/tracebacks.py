"""What the front-ends do with errors they have handled."""
from __future__ import annotations


def forget_frames(exc: BaseException | None) -> None:
    """Drop the tracebacks of a handled error and of the errors it came from. asyncio's and aiohttp's
    streams keep the error they raised, and its traceback keeps the frames that read them, the bodies in
    their locals: a reference cycle that only the garbage collector frees, and the daemon runs it rarely
    (clients that break uploads off, or an upstream that breaks answers off, would pile up their buffers)."""
    pending, seen = [exc], set()
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        err.__traceback__ = None
        pending += [err.__cause__, err.__context__]
