"""The package logger. ``ATTNPATCH_LOG=debug`` (or info, warning) turns it on; each distinct
message is emitted once so a fallback inside a 50-layer loop does not flood the terminal."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("attnpatch")
_seen: set[str] = set()
_configured = False


def _configure() -> None:
    global _configured
    _configured = True
    level = os.environ.get("ATTNPATCH_LOG", "").strip().upper()
    if level and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[attnpatch] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(getattr(logging, level, logging.DEBUG))


def log_once(level: int, msg: str) -> None:
    """Log ``msg`` at ``level`` the first time it is seen in this process."""
    if not _configured:
        _configure()
    if msg in _seen:
        return
    _seen.add(msg)
    logger.log(level, msg)


def warning(msg: str) -> None:
    """Log ``msg`` at WARNING every time (callers decide what is new, e.g. once per patch)."""
    if not _configured:
        _configure()
    logger.warning(msg)


def debug_once(msg: str) -> None:
    log_once(logging.DEBUG, msg)
