"""Log output as text (default) or as one JSON object per line (`--log-format json`), so a log pipeline
indexes job, adapter and request events by field rather than by parsing prose. Events are ordinary log
calls whose `extra` names the fields below; the text format shows their message only."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FIELDS = ("event", "job_id", "request_id", "adapter", "step", "sha256", "path", "state", "reason")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...the event fields a record carries, "exc" for a traceback}."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(fmt: str = "text", level: int | str = logging.INFO) -> None:
    """One handler on the root logger, on stderr, replacing any earlier one (uvicorn's loggers propagate to it
    when it is given no log config of its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
