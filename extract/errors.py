"""The one base class of the errors a user can fix: each says in one line what is wrong and what
to do. Every command catches :class:`UserError` (and only it) and prints that line; anything else
is a bug and keeps its traceback. The subclasses live beside the code that raises them
(``AnnotationError``, ``CacheMismatch``, ``CacheError``, ``RunError``, ``DiskFull``, ``Busy``…) and
also derive from the built-in exception they refine, so ``except ValueError`` still sees them."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix, said in one line."""


class ConfigError(UserError, ValueError):
    """A config value, or a combination of values, that cannot be trained or built."""
