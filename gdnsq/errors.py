"""The one error family for bad user input. Standard library only, so every layer can raise these.

Each message is one line that names the field, file or reference at fault; the CLI prints it and exits
with status 2 (``except GdnsqError``). The second base keeps each class catchable as the builtin it
refines (a ``ValueError`` for a bad value, ``LookupError`` for a missing registry entry, ...).
"""

from __future__ import annotations


class GdnsqError(Exception):
    """A user error: the message is one line and says what is wrong and where."""


class ConfigError(GdnsqError, ValueError):
    """A bad setting; the message names the dotted field (``quant.target_w: ...``)."""


class SurgeryError(ConfigError):
    """A quantization rule that cannot apply to the model (no layer matches, unsupported layer)."""


class SweepError(ConfigError):
    """A bad sweep file or sweep state (unknown key, empty space, nothing to resume)."""


class DataError(GdnsqError, ValueError):
    """Unusable data (missing path, empty ImageFolder, corrupt .beton); the message names the path."""


class RegistryError(GdnsqError, LookupError):
    """A model reference that the registry cannot resolve, or a store that cannot be reached."""


class ExportError(GdnsqError, ValueError):
    """A checkpoint or packed file that cannot be exported or loaded (missing, corrupt, wrong format)."""


class ClusterError(GdnsqError, RuntimeError):
    """A Ray cluster or job server that cannot be reached or refuses a request."""


class RunIdentityError(ConfigError):
    """A run name whose stored checkpoint was trained with other defining settings (or no such run)."""


class StorageError(GdnsqError, OSError):
    """A storage path that cannot be written (read-only, full, not a folder); names the path."""
