"""One exception tree for the supervisor side; each class carries its exit code.

The CLI catches CollectordError at the top, prints str(err) as one line and exits
with err.exit_code. Nothing below it prints tracebacks for these.
"""

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_NOTRUNNING = 3  # LSB status: program is not running
EX_STATUS_UNKNOWN = 4  # LSB status: program or service status is unknown
EX_NOTCONFIGURED = 6  # LSB init actions (stop): program is not configured
EX_CONFIG = 78  # sysexits.h EX_CONFIG: a restart cannot fix it


class CollectordError(Exception):
    """Root of every error collectord raises on purpose."""

    exit_code = EX_FAILURE


class ConfigError(CollectordError):
    """A bad configuration value; the message names file, section and key."""

    exit_code = EX_CONFIG

    def __init__(self, message, *, path=None, section=None, key=None):
        self.path, self.section, self.key = path, section, key
        where = ", ".join(
            part
            for part in (
                str(path) if path else None,
                f"[{section}]" if section else None,
                key,
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class AlreadyRunning(CollectordError):
    """start found a live daemon holding the PID file lock."""

    exit_code = EX_FAILURE


class NotRunning(CollectordError):
    """A command that needs a running daemon found none."""

    exit_code = EX_NOTRUNNING


class StatusUnknown(CollectordError):
    """status cannot tell whether the daemon runs (the config naming its PID file is unusable)."""

    exit_code = EX_STATUS_UNKNOWN


class NotConfigured(CollectordError):
    """stop cannot find the daemon: the config naming its PID file is unusable."""

    exit_code = EX_NOTCONFIGURED


class PidFileError(CollectordError):
    """The PID file cannot be created, locked or trusted (symlink, foreign owner)."""

    exit_code = EX_FAILURE


class StartError(CollectordError):
    """The daemon failed before it became ready; the message says why."""

    exit_code = EX_FAILURE


class StopTimeout(CollectordError):
    """stop gave up waiting for the daemon to release its lock."""

    exit_code = EX_FAILURE


class UnreachableError(CollectordError):
    """check: the database or the exchange did not answer."""

    exit_code = EX_FAILURE


class UsageError(CollectordError):
    """A bad command line value (a date that does not parse, an unknown table)."""

    exit_code = EX_USAGE


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command that cleans up after itself (export).

    A KeyboardInterrupt, so psycopg2's wait callback cancels the running query on it too.
    exit_code is 128 + the signal number.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum
