"""The project's error vocabulary for input a user must fix.

Every such error prints as one line that starts with the config key it concerns, for example
``train.optim.name: unknown value 'adamw'; allowed: adam, sgd, lars``. The command-line guard
turns each of them into that line on stderr and exit code 2, without a traceback.

- :class:`UsageError`: the base class; the CLI guard catches it.
- :class:`SettingError`: a setting (a field of :mod:`models.config`, or an argument of a
  network constructor) holds a value the code cannot use.
- :class:`DataError`: the data a setting points at is missing or unusable (or a ``data.*``
  setting itself is out of range).

``search.config.ConfigError`` (a study file or override is unusable) is a :class:`UsageError`
as well. Failures that are not the user's input (a diverging loss, a bug) are not.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Input the user must fix; ``str(error)`` is one line naming the key."""


class SettingError(UsageError):
    """A setting holds a value the code cannot use; the message starts with its key."""


class DataError(UsageError):
    """Unusable data or data settings; the one-line message names the config field."""


__all__ = ["DataError", "SettingError", "UsageError"]
