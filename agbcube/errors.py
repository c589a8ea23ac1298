"""Exceptions raised by agbcube.

Every exception subclasses `AgbcubeError` *and* the matching built-in, so callers can
catch either ``except agbcube.AgbcubeError`` or ``except ValueError`` (the pattern of
``rioxarray.exceptions`` and ``torchgeo.datasets.errors``). Messages name the site, file, band
or configuration key, the value found, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AgbcubeError",
    "BandError",
    "CatalogueUnreachableError",
    "ConfigError",
    "CubeError",
    "EstimateError",
    "FoldError",
    "GridError",
    "InputFileError",
    "MissingCRSError",
    "MissingDependencyError",
    "NoOverlapError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputWriteError",
    "StacError",
    "TrainingError",
]


class AgbcubeError(Exception):
    """Base class of every error agbcube raises on purpose."""


class ConfigError(AgbcubeError, ValueError):
    """The YAML configuration is invalid: unknown key, wrong type or inconsistent values."""


class InputFileError(AgbcubeError, FileNotFoundError):
    """An input raster is missing or cannot be read as a raster."""


class MissingCRSError(AgbcubeError, ValueError):
    """An input raster has no coordinate reference system."""


class GridError(AgbcubeError, ValueError):
    """A raster grid cannot be used (empty, rotated, wrong band count for the role)."""


class NoOverlapError(GridError):
    """The satellite stack and the AGB map do not overlap."""


class BandError(AgbcubeError, KeyError):
    """A band name is missing, duplicated, or band count and names disagree."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message with quotes
        return str(self.args[0]) if self.args else ""


class CubeError(AgbcubeError, ValueError):
    """A cube store is missing, incomplete, or was built from other inputs than expected."""


class FoldError(AgbcubeError, ValueError):
    """Chips cannot be split into the requested folds (too few chips, empty training set)."""


class OutputLockedError(AgbcubeError, RuntimeError):
    """Another agbcube process is writing the same output."""


class OutputExistsError(AgbcubeError, FileExistsError):
    """An output path holds something agbcube did not write, which it never removes or replaces."""


class OutputWriteError(AgbcubeError, OSError):
    """An output cannot be written: full disk, read-only file system, no permission."""

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


class TrainingError(AgbcubeError, RuntimeError):
    """Training cannot continue (diverged loss, out of memory, incompatible checkpoint)."""


class EstimateError(AgbcubeError, ValueError):
    """Area estimates: bad polygons, areas off the maps, a run without an error model."""


class StacError(AgbcubeError, ValueError):
    """A STAC source cannot give what a site needs (no items for a sensor, an asset missing)."""


class CatalogueUnreachableError(AgbcubeError, ConnectionError):
    """A STAC catalogue or API cannot be opened (missing file, no network, bad URL)."""


class MissingDependencyError(AgbcubeError, ImportError):
    """A package of an optional extra is not installed (the message names the extra)."""


#: Import names whose distribution is spelt otherwise (the rest: ``_`` read as ``-``).
_DISTRIBUTION_OF = {"sklearn": "scikit-learn", "odc": "odc-geo", "yaml": "pyyaml"}
_ROLES = ("cube", "train", "cluster")  # the extras a user installs for a role


def missing_dependency(err: ModuleNotFoundError) -> MissingDependencyError | None:
    """The extra that provides the module ``err`` could not import, as an error naming it
    (``pip install 'agbcube[cube]'``); None when no extra of agbcube's provides it."""
    import re
    from importlib import metadata

    top = (err.name or "").split(".")[0]
    wanted = _DISTRIBUTION_OF.get(top, top).lower().replace("_", "-")
    try:
        requires = metadata.requires("agbcube") or []
    except metadata.PackageNotFoundError:  # agbcube itself not installed: nothing to name
        return None
    extras = []
    for line in requires:
        name = re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-")
        extra = re.search(r"extra == [\"']([\w-]+)[\"']", line)
        if name == wanted and extra and extra[1] in _ROLES:
            extras.append(extra[1])
    if not extras:
        return None
    which = " or ".join(f"pip install 'agbcube[{e}]'" for e in extras)
    return MissingDependencyError(
        f"{top} is not installed, and this command needs it: {which} (or agbcube[all])"
    )


def one_line(message: object, limit: int | None = None) -> str:
    """A library's message (an exception or a text) on one line, cut to ``limit`` characters:
    how an agbcube error quotes another message and stays one line."""
    text = " ".join(str(message).split())
    return text if limit is None else text[:limit]
