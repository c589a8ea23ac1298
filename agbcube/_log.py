"""How the library reports progress: module loggers under ``agbcube``, never print.

The library only logs (``logging.getLogger(__name__)``) and warns; the CLI alone attaches
handlers and sets levels (``-q``: warnings only, ``-v``: debug).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

__all__ = ["reporter"]


def reporter(
    logger: logging.Logger, echo: Callable[[str], None] | None = None
) -> Callable[[str], None]:
    """Where a stage's progress lines go: ``logger.info``, or a caller's deprecated ``echo``.

    ``echo`` still works (it receives the lines instead of the logger, as before) but warns:
    configure logging for the ``agbcube`` logger instead.
    """
    if echo is None:
        return logger.info
    warnings.warn(
        "the echo= argument is deprecated: agbcube logs its progress to the 'agbcube' logger "
        "(logging.getLogger('agbcube')); configure logging instead",
        DeprecationWarning,
        stacklevel=3,
    )
    return echo
