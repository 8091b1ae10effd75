"""Logging set-up: plain or JSON lines, with credentials redacted from every record."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from sam3_batch.contracts.redact import redact

_EXTRA_FIELDS = ("job_id", "chunk_id", "uri")


class RedactingFilter(logging.Filter):
    """Masks URL passwords and registered secrets in the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and job/chunk ids when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in _EXTRA_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def json_line(message: str, logger: str, level: str = "INFO") -> str:
    """One record in the JSON formatter's shape, built without the logging machinery (signal handlers)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return json.dumps({"ts": stamp, "level": level, "logger": logger, "message": redact(message)}, ensure_ascii=False)


def setup_logging(json_lines: bool, level: str = "INFO") -> None:
    """Configure the root logger once for the process; with ``json_lines``, warnings become JSON records
    too and libraries' progress bars (tqdm, huggingface_hub) are switched off, so stderr stays JSON."""
    logging.captureWarnings(True)
    if json_lines:
        for variable in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(variable, "1")  # read by those libraries in this process and its children
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
