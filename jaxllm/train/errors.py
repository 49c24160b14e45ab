"""The training pipeline's user error."""
from __future__ import annotations


class DataError(ValueError):
    """Bad training input (missing, empty or undecodable data; an incompatible run directory).
    One line naming the bad value and what is allowed; the CLI prints it and exits 2."""
