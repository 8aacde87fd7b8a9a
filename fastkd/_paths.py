"""File names read from an index (a cache manifest, a checkpoint's file list) stay in its directory.

A manifest or a ``checkpoint.json`` may come from elsewhere (a download, a shared disk): the file
names it lists are data, not paths to follow. :func:`contained_file` accepts a plain file name
(no directory part, no ``..``, not absolute) whose resolved path, symlinks followed, is still
inside the directory; anything else is an error raised before the file is opened, so no message
ever reports the size or checksum of a file outside.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Type


def contained_file(directory, name, *, where: str, error: Type[Exception]) -> Path:
    """``directory / name`` when ``name`` is a plain file name that resolves inside ``directory``.

    Args:
        directory: the directory the index describes.
        name: the file name the index gives.
        where: what listed it, for the message (``"manifest.json shards[2].file"``).
        error: the exception class to raise (``CacheError``, ``CheckpointError``).

    Raises:
        ``error``: ``name`` is not a str, is empty, has a directory part (``/`` or ``\\``), is
            ``.``/``..``, is absolute, or is a symlink (or lies below one) that leaves ``directory``.
    """
    if not isinstance(name, str) or not name:
        raise error(f"{where}: a file name must be a non-empty string, got {name!r}")
    plain = (name not in (".", "..") and PurePosixPath(name).name == name
             and PureWindowsPath(name).name == name and "\x00" not in name)
    if not plain:
        raise error(f"{where}: {name!r} is not a plain file name inside {directory} (no directory "
                    "part, '..' or absolute path is allowed); the index may be crafted")
    directory = Path(directory)
    path = directory / name
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise error(f"{where}: {name!r} cannot be resolved ({exc})") from None
    if not inside:
        raise error(f"{where}: {name!r} is a symlink that leaves {directory}; refusing to read it")
    return path
