"""Usage errors of the bundle's commands: one line naming the option (or file) and the problem, exit status 2.

MONAI's config parser wraps every ``Exception`` raised while it evaluates an expression in a ``RuntimeError`` per
level of references, which prints 50-60 lines of ``Failed to evaluate ConfigExpression`` for a missing option.
``SystemExit`` is not an ``Exception``, so it passes through the parser and ``monai.bundle``'s ``run`` untouched: the
configs call the functions that read the user's options through :func:`exit_on_usage_error`, which turns their
usage errors into one line and ``SystemExit(2)`` (argparse's status for a wrong command line). The functions
themselves keep raising ordinary exceptions for their Python callers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from functools import wraps
from pathlib import Path
from typing import TypeVar

from .errors import RegistrationInputError

USAGE_EXIT_STATUS = 2
Result = TypeVar("Result")


class UsageError(ValueError):
    """A command-line option is missing, clashes with another or has a value that cannot be used.

    Args:
        option: the option at fault as the user types it (``--target``).
        problem: what is wrong, in words a user can act on.
    """

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"{option}: {problem}")


def exit_on_usage_error(
    function: Callable[..., Result], options: Mapping[str, object] | None = None
) -> Callable[..., Result]:
    """``function``, but a :class:`UsageError` or :class:`RegistrationInputError` it raises prints ``error: <what>``
    on one line to stderr and exits with status 2 instead of propagating.

    Args:
        function: what a config calls with the user's options.
        options: ``{option: value}`` of the options that name files (``{"--results_csv": "out/results.csv"}``): an
            input error about one of these files names the option too.

    Example (a config expression): ``"$exit_on_usage_error(select_pairs, {'--pairs_csv': @pairs_csv})(...)"``.
    """
    files = {str(Path(value)): option for option, value in (options or {}).items() if value is not None}

    @wraps(function)
    def checked(*args, **kwargs) -> Result:
        try:
            return function(*args, **kwargs)
        except (UsageError, RegistrationInputError) as error:
            option = files.get(getattr(error, "path", None))
            text = f"{option} {error}" if option else str(error)
            print("error: " + " ".join(text.split()), file=sys.stderr, flush=True)
            raise SystemExit(USAGE_EXIT_STATUS) from None

    return checked
