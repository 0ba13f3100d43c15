"""Errors a user may see.

Every error that reaches the command line is a ``BuffyError``: its message is one
clear line and its ``exit_code`` is the process status (SPEC: 1 failed operation,
2 bad input). Anything else escaping is a bug.

    BuffyError (exit 1)            a failed operation
    ├── NotFound                   unknown source or version
    ├── CacheError                 the cache directory or index is unusable
    ├── FetchError                 a download failed (network, HTTP status, integrity)
    └── BadInput (exit 2)          bad names, URLs, option values, config files
"""

from __future__ import annotations


class BuffyError(Exception):
    exit_code = 1


class NotFound(BuffyError):
    pass


class CacheError(BuffyError):
    pass


class FetchError(BuffyError):
    pass


class BadInput(BuffyError):
    exit_code = 2
