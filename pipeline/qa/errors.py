"""Error type of the QA stage."""

from __future__ import annotations


class QAError(Exception):
    """QA cannot run: a missing table, an unreadable file, a bad setting. The message names it."""
