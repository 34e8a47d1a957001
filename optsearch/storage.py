"""Storage URLs: the default, masking passwords, and Optuna RDB storages tuned per backend."""

from __future__ import annotations


class StorageError(Exception):
    """The storage URL is malformed or the database cannot be reached."""
