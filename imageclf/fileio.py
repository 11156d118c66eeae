"""Atomic file writes: a reader never sees a half-written output, and a failed write leaves
the previous good file in place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imageclf.errors import PipelineError

# the write failed for lack of room: the user can free space and rerun
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it over `path` only if the block succeeds.

    The temporary file lives in the same folder so that `os.replace` is atomic.
    The temporary name keeps the final suffix, because some writers (numpy, Keras)
    choose the format by suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    # mkstemp makes the file private (0600); outputs get the usual permissions instead
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in _NO_ROOM:
            raise
        raise PipelineError(
            f"{path}: writing failed: {exc.strerror}. Free disk space and rerun; "
            f"the previous {path.name}, if any, is unchanged."
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
