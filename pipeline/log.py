"""Progress and error messages of every stage, through :mod:`logging`.

Each stage logs to ``pipeline.<stage>`` (``get_logger("features")``); :func:`setup` (called by the
command-line entry points) sends them to stderr, one line per message, as ``[stage] message``
(``ERROR [stage] ...`` for errors, ``warning [stage] ...`` for warnings), which reads well in a terminal
and in a job's log file. Progress lines are throttled with :class:`Throttle`, so a log file stays readable
however many patches or epochs a job runs. Library use (tests, notebooks) sees the records through the
usual logging machinery and nothing on stderr unless it configures logging itself.
"""

from __future__ import annotations

import logging
import sys
import time

ROOT = "pipeline"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        stage = name[len(ROOT) + 1:].split(".")[0] if name.startswith(ROOT + ".") else name
        text = f"[{stage}] {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            text = f"ERROR {text}"
        elif record.levelno >= logging.WARNING:
            text = f"warning {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # set by StreamHandler.__init__; stderr is looked up per record
        pass


_handler: logging.Handler | None = None


def get_logger(stage: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{stage}")


def setup(level: int = logging.INFO) -> logging.Handler:
    """Send the pipeline's log records to stderr as one line each; idempotent. Returns the handler
    (remove it with :func:`teardown`)."""
    global _handler
    logger = logging.getLogger(ROOT)
    if _handler is not None and _handler in logger.handlers:
        logger.setLevel(level)
        return _handler
    _handler = _StderrHandler()
    _handler.setFormatter(_Formatter())
    logger.addHandler(_handler)
    logger.setLevel(level)
    return _handler


def teardown() -> None:
    """Remove the handler :func:`setup` installed (entry points called in-process, e.g. by tests)."""
    global _handler
    if _handler is not None:
        logging.getLogger(ROOT).removeHandler(_handler)
        _handler = None
    logging.getLogger(ROOT).setLevel(logging.NOTSET)


class Throttle:
    """``ready()`` is true at most once every ``every_s`` seconds (always with ``force``): for progress
    lines that must not flood a log file."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = float(every_s)
        self.t0 = self.last = time.monotonic()

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return False
        self.last = now
        return True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0
