"""Small files written so that a crash leaves the old one or the new one,
never half of either: written to a temporary name, fsync'ed, renamed, and
the directory fsync'ed so the rename itself survives."""

import json
import os

from .errors import RpofsError


def write_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """data at path, durably; owner-only by default (holds, run records, a
    UEFI variable store and a TPM state: the last two can hold secrets)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_dir(os.path.dirname(path) or ".")


def sync_dir(path: str) -> None:
    """Make the names in a directory (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str):
    """What a small JSON file (written by write_file) holds; None when there
    is none; one RpofsError line when it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RpofsError(f"{path} cannot be read: {e}") from None
