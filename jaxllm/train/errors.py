"""The training pipeline's user error and the one way it writes files (temporary name, then rename)."""
from __future__ import annotations

import os
from pathlib import Path


class DataError(ValueError):
    """Bad training input (missing, empty or undecodable data; an incompatible run directory).
    One line naming the bad value and what is allowed; the CLI prints it and exits 2."""


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to `path.tmp` and rename into place, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
