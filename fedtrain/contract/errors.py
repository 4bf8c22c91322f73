"""Error classes of the worker, each with its own process exit code.

A Job that fails tells its cause through its exit code alone, so the operator (or the local
runner) can tell a bad spec from broken data from a poisoned round from a bug from a store that is down
for a while, without parsing logs.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_BAD_DATA = 3
EXIT_REJECTED_UPDATES = 4
EXIT_NON_FINITE_MODEL = 5
EXIT_SECURE_ROUND = 6
EXIT_INTERNAL = 70
EXIT_TEMPORARY = 75  # EX_TEMPFAIL of sysexits.h: the same command may succeed if run again later
EXIT_REFUSED = 77  # EX_NOPERM: a site's policy refused the task before it touched the site's data

EXIT_CODE_NAMES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_BAD_INPUT: "bad input",
    EXIT_BAD_DATA: "bad data",
    EXIT_REJECTED_UPDATES: "rejected updates",
    EXIT_NON_FINITE_MODEL: "non-finite model",
    EXIT_SECURE_ROUND: "secure aggregation failed",
    EXIT_INTERNAL: "internal error",
    EXIT_TEMPORARY: "temporary storage failure",
    EXIT_REFUSED: "refused by the site",
}


class WorkerError(Exception):
    """Base of all errors the worker reports on purpose."""

    exit_code = EXIT_INTERNAL


class BadInputError(WorkerError):
    """An argument or configuration value is wrong; the message names it and the fix."""

    exit_code = EXIT_BAD_INPUT


class BadDataError(WorkerError):
    """A data set, weights file or manifest on disk is missing or malformed; the message names the file."""

    exit_code = EXIT_BAD_DATA


class TooLargeError(BadDataError):
    """A file someone else wrote is over the size its reader allows (`Store.read_bounded`): refused unread."""


class RejectedUpdatesError(WorkerError):
    """Too few client updates survived validation to aggregate a round."""

    exit_code = EXIT_REJECTED_UPDATES


class NonFiniteModelError(WorkerError):
    """The aggregation produced a global model (or server state) with NaN or Inf: it is never written.

    Every update was finite, yet a server optimiser's step or a sum can overflow; the round fails
    like one that missed its quorum, so the engine's straggler rules decide whether it runs again.
    """

    exit_code = EXIT_NON_FINITE_MODEL


class SecureRoundError(WorkerError):
    """A secure round's sum could not be recovered: too few survivors' shares, a refused share, a value out of range.

    Like a missed quorum, it fails the round, not the training: the engine's straggler rules decide.
    """

    exit_code = EXIT_SECURE_ROUND


class TemporaryStorageError(WorkerError):
    """The store did not answer in time, or asked to slow down, past the client's own retries.

    Unreachable endpoints, dropped connections, timeouts, HTTP 5xx, 429 and SlowDown say nothing
    about the training's data, so they are neither bad data nor a client's rejected update: the task
    exits with its own code and the engine runs it again.
    """

    exit_code = EXIT_TEMPORARY


class RefusedError(WorkerError):
    """A site's policy does not accept the task (strategy, model, rounds, epochs or privacy)."""

    exit_code = EXIT_REFUSED
