"""Files on a sweep's storage: a local (or shared) directory, or a bucket on an object store Ray Tune writes to
through ``pyarrow.fs`` (``s3://``, ``gs://``: URIs whose host is the bucket; tested on S3's protocol).

A checkpoint's *location* is its directory as the sweep recorded it: an absolute local path, or a URI that keeps
the storage path's scheme, credentials and query (``s3://bucket/sweeps/x/trial/checkpoint_000010?region=...``),
so that any process on any node can open it. :func:`local_file` gives a file at a location as a local path,
downloading it once into a cache directory when it is remote; :func:`copy_file` copies one to a given path;
:func:`read_text`, :func:`write_text` and :func:`remove` handle the sweep's own small files.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_text

CACHE_ENV = "GEOPOSE_RAY_STORAGE_CACHE"  # where remote files are downloaded to (default: the temp dir)
_CHUNK = 8 << 20


def is_remote(location: str | os.PathLike[str]) -> bool:
    """A URI of a remote filesystem (``file://`` and plain paths are local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def redact(text: str | os.PathLike[str]) -> str:
    """``text`` (a location, or a message that quotes one) without the credentials of any URI in it."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@?#\s'\"]*@", r"\1***@", str(text))


def checkpoint_location(filesystem: Any, path: str, storage_path: str) -> str:
    """Where a Tune checkpoint (its pyarrow ``filesystem`` and ``path``) is, as a location any process can open.

    Tune's path on an object store is bucket-relative and without the scheme, credentials and query the storage
    path gave (``bucket/sweeps/x/trial/checkpoint_000010``); they are put back from ``storage_path``. A local
    path is made absolute.
    """
    if getattr(filesystem, "type_name", "local") == "local":
        return str(Path(path).resolve())
    parts = urlsplit(storage_path)
    if not parts.scheme or not parts.netloc:
        raise DataError(f"storage path {redact(storage_path)!r} is not a URI, but its checkpoint {path!r} is remote")
    userinfo = parts.netloc.rpartition("@")[0]
    # Tune's path is plain text (a sweep may be named "my sweep#2"); pyarrow decodes the escapes back.
    return f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{quote(path.lstrip('/'), safe='/')}" + (
        f"?{parts.query}" if parts.query else ""
    )


def join(location: str | os.PathLike[str], name: str) -> str:
    """The location of file ``name`` in directory ``location`` (a URI's query stays at its end)."""
    text = str(location)
    if not is_remote(text):
        return str(_local(text) / name)
    base, sep, query = text.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def _local(location: str) -> Path:
    return Path(location.removeprefix("file://"))


def storage_errors() -> tuple[type[BaseException], ...]:
    """What pyarrow's filesystems raise when a storage cannot be reached or refuses: I/O errors, and Arrow's own
    (``ArrowInvalid`` is also a ValueError; others, like ``ArrowNotImplementedError``, are not)."""
    import pyarrow.lib

    return OSError, ValueError, pyarrow.lib.ArrowException


@functools.lru_cache(maxsize=16)
def _filesystem(base: str) -> tuple[Any, str]:
    import pyarrow.fs

    if _filesystem.cache_info().currsize == 0:  # pyarrow's own exit handler is in place by now: ours runs first
        atexit.register(_filesystem.cache_clear)  # a filesystem alive at pyarrow's S3 finalizer can hang the exit
    return pyarrow.fs.FileSystem.from_uri(base)


def _open(location: str) -> tuple[Any, str]:
    """The filesystem and path of a remote location. One filesystem per storage (scheme, bucket, credentials and
    query) and process: on S3 without a region in the URI, making one looks the bucket's region up."""
    parts = urlsplit(location)
    try:
        fs, root = _filesystem(urlunsplit((parts.scheme, parts.netloc, "", parts.query, "")))
        return fs, root.rstrip("/") + unquote(parts.path)
    except storage_errors() as e:
        raise DataError(
            f"{redact(location)}: cannot open this storage ({redact(str(e))}); check the URI and credentials"
        ) from e


def _remote(location: str) -> tuple[Any, str, tuple[int, int] | None]:
    """A remote location's filesystem, path on it, and the file's (size, modification time in ns), None if there
    is no such file."""
    import pyarrow.fs

    fs, path = _open(location)
    try:
        info = fs.get_file_info(path)
    except storage_errors() as e:
        raise DataError(
            f"{redact(location)}: cannot read this storage ({redact(str(e))}); check its credentials, network"
        ) from e
    if info.type != pyarrow.fs.FileType.File:
        return fs, path, None
    return fs, path, (int(info.size or 0), int(info.mtime_ns or 0))


def _existing(location: str) -> tuple[Any, str, tuple[int, int]]:
    """:func:`_remote` of a file that must exist."""
    fs, path, found = _remote(location)
    if found is None:
        raise DataError(f"{redact(location)}: no such file on the sweep's storage; was the sweep's storage moved?")
    return fs, path, found


def stat(location: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(size in bytes, modification time in ns) of the file at ``location``; None if there is no such file."""
    text = str(location)
    if is_remote(text):
        return _remote(text)[2]
    local = _local(text)
    if not local.is_file():
        return None
    st = local.stat()
    return st.st_size, st.st_mtime_ns


def local_file(location: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> Path:
    """The file at ``location`` as a local path: itself, or for a remote one a copy downloaded into ``cache``
    (default ``$GEOPOSE_RAY_STORAGE_CACHE``, else a directory of this user's in the temp dir). A copy of the same
    size and modification time is reused.

    Raises:
        DataError: no such file, or the storage cannot be read (naming the location, credentials left out).
    """
    text = str(location)
    if not is_remote(text):
        return _local(text)
    dest = cached_copy(text, cache)
    fs, path, found = _existing(text)
    if not (dest.is_file() and (dest.stat().st_size, dest.stat().st_mtime_ns) == found):
        _download(text, fs, path, found, dest)
    return dest


def cached_copy(location: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`local_file` keeps its copy of the remote file at ``location`` (whether it is there or not)."""
    default = Path(tempfile.gettempdir()) / f"geopose-ray-storage-{os.getuid()}"
    root = Path(cache or os.environ.get(CACHE_ENV) or default)
    key = hashlib.sha256(redact(location).encode()).hexdigest()[:20]
    return root / key / Path(urlsplit(location).path).name


def copy_file(location: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy the file at ``location`` (local or remote) to the local path ``dest``, which appears complete or not
    at all.

    Raises:
        DataError: no such file, or the storage cannot be read.
    """
    text, dest = str(location), Path(dest)
    if is_remote(text):
        _download(text, *_existing(text), dest)
        return
    source = _local(text)
    if not source.is_file():
        raise DataError(f"{source}: no such file; was the sweep's storage moved?")
    try:
        shutil.copyfile(source, dest)
    except OSError as e:
        raise DataError(f"{source}: cannot copy it to {dest} ({e})") from e


def _download(location: str, fs: Any, path: str, found: tuple[int, int], dest: Path) -> None:
    """Download the remote file at ``path`` on ``fs`` (``found``: its size and modification time; ``location``
    names it in errors) to ``dest``: written to a temporary file of its own beside it and renamed when complete,
    so a reader never sees half a file and concurrent downloads of one file do not mix; the copy takes the
    original's modification time."""
    size, mtime = found
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        tmp = Path(name)
        with fs.open_input_stream(path) as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        if tmp.stat().st_size != size:
            raise DataError(f"{redact(location)}: downloaded {tmp.stat().st_size} of {size} bytes; try again")
        os.utime(tmp, ns=(mtime, mtime))
        os.replace(tmp, dest)
    except storage_errors() as e:
        raise DataError(
            f"{redact(location)}: cannot download it ({redact(str(e))}); check the storage's credentials and network"
        ) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def read_text(location: str | os.PathLike[str]) -> str | None:
    """The UTF-8 text of the file at ``location``; None if there is no such file.

    Raises:
        DataError: the storage cannot be read (naming the location, credentials left out).
    """
    text = str(location)
    if not is_remote(text):
        local = _local(text)
        if not local.is_file():
            return None
        try:
            return local.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{local}: cannot read it as text ({e})") from e
    fs, path, found = _remote(text)
    if found is None:
        return None
    try:
        with fs.open_input_stream(path) as f:
            data = bytes(f.read())
    except storage_errors() as e:
        raise DataError(f"{redact(text)}: cannot read it ({redact(str(e))}); check the storage's network") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{redact(text)}: not UTF-8 text ({e}); was it overwritten by another program?") from e


def write_text(location: str | os.PathLike[str], content: str) -> None:
    """Write ``content`` to the file at ``location``, whole or not at all: a local file is renamed into place, an
    object is stored by the object store only once its upload completes.

    Raises:
        DataError: the storage cannot be written (naming the location, credentials left out).
    """
    text = str(location)
    if not is_remote(text):
        atomic_write_text(_local(text), content)
        return
    fs, path = _open(text)
    data = content.encode("utf-8")
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except storage_errors() as e:
        raise DataError(
            f"{redact(text)}: cannot write it ({redact(str(e))}); check the storage's credentials and network"
        ) from e


def remove(location: str | os.PathLike[str]) -> None:
    """Delete the file at ``location`` if there is one.

    Raises:
        DataError: the storage cannot be reached.
    """
    text = str(location)
    if not is_remote(text):
        _local(text).unlink(missing_ok=True)
        return
    fs, path, found = _remote(text)
    if found is None:
        return
    try:
        fs.delete_file(path)
    except storage_errors() as e:
        raise DataError(f"{redact(text)}: cannot delete it ({redact(str(e))}); check the storage's credentials") from e
