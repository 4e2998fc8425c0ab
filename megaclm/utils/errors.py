"""One error type for bad user input, and the CLI wrapper that turns it into one clear line.

Every entry point runs under `cli_main`, so a bad flag, a missing file or a malformed input ends
with `error: <what and what to do>` on stderr and exit status 2 - never a traceback.
"""
import sys
from typing import Callable, NoReturn

from megaclm.utils import exitcodes


class UserError(Exception):
    """Bad input from the user: the message names the input and says what to do."""


def fail(msg: str) -> NoReturn:
    raise UserError(msg)


def cli_main(main: Callable[[], int | None]) -> NoReturn:
    """Run `main()`; UserError -> one `error:` line and exit 2; Ctrl-C -> exit 130."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(exitcodes.BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(exitcodes.INTERRUPTED)
    sys.exit(code or 0)
