"""The one base class of every error that is the user's to fix.

The command line prints these as one line without a traceback; anything else is a bug and
keeps its traceback. Stages and library modules subclass it, so `pgraft/cli.py` needs no
import of any stage to know which errors are the user's.
"""

from __future__ import annotations


class PgraftError(RuntimeError):
    """Bad config, missing input or unusable data; the message says what to do."""


class ConfigError(PgraftError, ValueError):
    """A config file, override or named plug-in is wrong; the message names the key."""


class TrainError(PgraftError):
    """A trainer (the train stage, the noise corrector) cannot run as configured; the message says why."""
