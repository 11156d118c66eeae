"""The one exception type for faults a user can fix (bad params, data, sources)."""

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem with the user's input: the message names the file, key or URL and what to do.

    Stage scripts print it as a single line and exit with status 1, without a traceback.
    """


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`; a `PipelineError` becomes one line on stderr and exit status 1."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
