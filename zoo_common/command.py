"""``run_command``: a module's ``main`` run as a shell command, where a user's mistake prints one line.

Bad data, configuration, checkpoint and weight files raise errors whose message names the file or field
and the fix (``ValueError`` and ``FileNotFoundError`` and their subclasses, such as
``backbones.weights.WeightsError``); that message is what the user needs, not a traceback through the
library. ``RESIDUAL_ZOO_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def run_command(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Call ``main()`` and exit: with its return code when it returns an int, 0 otherwise, and 1 after one
    ``error: <message>`` line on standard error when it raises one of ``USER_ERRORS`` or ``user_errors``."""
    try:
        result = main()
    except (*USER_ERRORS, *user_errors) as err:
        if os.environ.get("RESIDUAL_ZOO_TRACEBACK"):
            raise
        print(f"error: {message(err)}\n(set RESIDUAL_ZOO_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


def message(err: BaseException) -> str:
    """The error's own message, also when a ``DataLoader`` worker raised it: the loader re-raises it in the
    training process as ``Caught <Error> in DataLoader worker process <n>.`` followed by the worker's
    traceback, whose last entry is the original ``<module>.<Error>: <message>``."""
    text = str(err)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    kind = type(err)
    names = {kind.__qualname__, f"{kind.__module__}.{kind.__qualname__}"}
    start = max((text.rfind(f"\n{name}: ") for name in names), default=-1)
    if start < 0:
        return text
    return text[text.index(": ", start) + 2 :].rstrip()
