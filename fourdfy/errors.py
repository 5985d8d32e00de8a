"""Errors a user fixes by changing the command line, the config or the installation, not the code.

Their message names what to change (the config key, the path, the pip command) and how; entry points print
it without a traceback (``run.py``, ``fourdfy``, ``python -m eval.*``). This module imports nothing heavy,
so an entry point can catch ``UserError`` before it has loaded torch or the priors.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class UserError(Exception):
    """Base of the errors whose message is the whole story: print it, skip the traceback."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (out of range, unknown, or wrong for this machine); names its key."""


# pyproject.toml's [project.optional-dependencies]: which extra installs each optional module.
EXTRA_OF_MODULE: dict[str, str] = {"wandb": "wandb", "trimesh": "export", "pygltflib": "export"}


class MissingExtraError(UserError, ModuleNotFoundError):
    """An optional dependency is not installed; the message gives the `pip install 'fourdfy[...]'` to run."""


def _missing_extra(module: str, needed_for: str) -> MissingExtraError:
    return MissingExtraError(
        f"{needed_for} needs the optional package {module!r}, which is not installed: "
        f"pip install 'fourdfy[{EXTRA_OF_MODULE[module]}]'",
        name=module,
    )


def require_extra(module: str, needed_for: str) -> None:
    """Raise MissingExtraError when ``module`` cannot be found, without importing it (config checks run
    before any work and must stay cheap). needed_for: what needs it, as the user asked for it
    (``logger.kind=wandb``, ``fourdfy export --mesh``)."""
    if importlib.util.find_spec(module) is None:
        raise _missing_extra(module, needed_for)


def import_extra(module: str, needed_for: str) -> ModuleType:
    """``import module`` (an optional dependency, see EXTRA_OF_MODULE); MissingExtraError when it is absent.

    A module that is installed but fails to import for another reason raises its own error unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # the package is there; one of its own imports failed: not a missing extra
            raise
        raise _missing_extra(module, needed_for) from err
