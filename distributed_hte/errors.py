"""User-facing errors.

Every error a user can fix (a bad spec, bad data, an unreachable cluster) is a
``UserError``: the CLI prints its one-paragraph message and exits with its
``exit_code``: 2 for bad input, 3 for a fit that did not converge when the spec asked
for convergence (``train.require_convergence``). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; the CLI exits with code 2."""

    exit_code = 2


class SpecError(UserError):
    """A job spec that cannot be parsed or does not validate."""


class DataError(UserError):
    """Input data that is missing, empty, or does not match what the kind needs."""


class ClusterError(UserError):
    """A Ray cluster that cannot be reached or refuses the request."""


class RunDirError(UserError):
    """A run directory that cannot be used as asked (e.g. already complete)."""


class ConvergenceError(UserError):
    """A fit whose convergence verdict is negative, with ``train.require_convergence``.

    Raised after the run's artefacts are written, so nothing is lost; the CLI exits with
    code 3 (not 2: the input was valid, the optimisation did not succeed).
    """

    exit_code = 3
