"""Optional dependencies, imported lazily, failing with the extra that provides them. Public: the SDK and
the server package (``tritonvision_server``, shipped in the same wheel) both use :func:`require`."""

from __future__ import annotations

import importlib

from .exceptions import MissingExtraError


def require(module: str, *, extra: str, what: str):
    """Import ``module`` or raise :class:`MissingExtraError` saying ``pip install 'tritonvision[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs the Python package {module!r}, which is not installed; "
            f"install it with: pip install 'tritonvision[{extra}]'"
        ) from exc
