"""The search's errors: one type for bad input, so the CLI prints one line instead of a traceback."""
from __future__ import annotations


class SearchError(ValueError):
    """Bad input to the search (unreadable query, empty gallery, missing or unknown checkpoint...)."""


class CacheMismatchError(SearchError):
    """An explicitly given cache file was made by another checkpoint/model/gallery."""
