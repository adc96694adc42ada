"""Errors caused by what a user gave (a folder, a list file, a checkpoint, an option), as
opposed to bugs. Each message names the file or option, what was expected and what was
found; the command-line scripts print it on one line and exit with status 1, without a
traceback (`exit_on_input_error`). Each class also derives from the built-in error a caller
would catch for it (FileNotFoundError, ValueError)."""

import sys


class InputError(Exception):
    """Something the user gave is wrong or unusable; the message says what and why."""


class ConfigError(InputError, ValueError):
    """A configuration value or combination that cannot run."""


class CheckpointError(InputError, ValueError):
    """The file is not a usable checkpoint (damaged, foreign, another architecture)."""


class InputNotFound(InputError, FileNotFoundError):
    """A file or folder the user named (a data root, a list, a checkpoint) does not exist."""


class DatasetError(InputError, ValueError):
    """A dataset file that exists but cannot be used (a malformed list line, a bad manifest)."""


def exit_on_input_error(main, prog: str) -> None:
    """Run `main()`; an InputError ends the process with `prog: error: <message>` on stderr
    (its lines joined) and exit status 1."""
    try:
        main()
    except InputError as error:
        sys.exit(f"{prog}: error: {' '.join(str(error).split())}")
