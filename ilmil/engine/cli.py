"""The command-line tools' entry point: a mistake in the user's input ends in one
``error: ...`` line on stderr and exit status 1, not a traceback."""
import sys

from .runner import RUN_ERRORS

__all__ = ["run_tool_main"]


def run_tool_main(main, argv=None):
    """``main(argv)``'s exit status; an error of ``RUN_ERRORS`` (its message names what
    was wrong, where, and the fix) is printed as ``error: <message>`` and gives 1."""
    try:
        return main(argv)
    except RUN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
