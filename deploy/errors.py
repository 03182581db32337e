"""The project's error types and the one CLI boundary that turns them into messages and exit codes.

Library code raises; only `cli` (wrapped around every `python -m <wing>.<stage>` entry point) prints.
- `UserError` (exit 2): a mistake in what the user gave us — a config key, a dataset row, a model file,
  an image. Its message names the file/row and the fix; no traceback is shown.
- `RunFailed` (exit 1): the inputs were fine but the run did not succeed (training diverged, an export
  did not match PyTorch, the INT8 accuracy guard failed).
Anything else is a bug in this project and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(ValueError):
    """Bad input from the user (file, config, data, model); the message says what to fix. Exit code 2."""


class RunFailed(RuntimeError):
    """Valid inputs, but the run did not succeed; the message says why. Exit code 1."""


def cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's `main`, mapping the project's errors to one `error:` line and an exit code."""
    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


class MissingInput(UserError):
    """A file an earlier stage should have written is absent; the message names the stage to run."""
