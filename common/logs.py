"""Logging set-up: one line per record, with the node and its role on every line."""

from __future__ import annotations

import logging
import sys


class _NodeContext(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.node = "-"
        self.role = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        record.role = self.role
        return True


_context = _NodeContext()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_context)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(node)s %(role)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def set_node_context(node: str, role: str) -> None:
    _context.node = node
    _context.role = role
