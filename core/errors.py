"""User-facing errors.

Every mistake a user can make (a bad path, a malformed file, no network) raises a
:class:`LumosError` subclass whose message is one self-contained line; the CLI prints
it without a traceback and exits with status 2.
"""


class LumosError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""


class DataError(LumosError):
    """A dataset file is missing or malformed; the message names file, line and column."""


class DownloadError(LumosError):
    """A public dataset could not be fetched or converted."""


class ConfigError(LumosError):
    """A command-line option or configuration value is invalid."""


class FederationError(LumosError):
    """The federation cannot go on as configured (too few nodes connected, every node raising); it
    resumes later."""
