"""The work_dir's files on any ``pyarrow.fs`` URI: a local path, ``file://``, ``s3://``, ``gs://`` (docs/design.md
§6.4, "Storage"). Every read and write of the pipeline's artifacts goes through here or ``pipeline.shards``.

A write is atomic: locally a temporary name then a rename; on an object store one PUT, which a reader sees whole or
not at all. Libraries that only write local files (``save_pretrained``, matplotlib) write into ``staged_dir``,
which then replaces the target; readers that only read local files get ``local_copy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

import pyarrow.fs as pafs

from pipeline.hashing import stream_sha256


def is_remote(uri: str) -> bool:
    """True for a URI that is not a local path (``file://`` counts as local)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://``, ``s3://``, ``gs://`` ... URI; local paths are made
    absolute. Local files are memory-mapped on read, so Arrow IPC shards are read without copies."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(use_mmap=True), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs = pafs.LocalFileSystem(use_mmap=True)
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def local_cache(uri: str) -> str:
    """A local directory that belongs to ``uri`` (a remote work_dir's MLflow database, logs and generated data):
    ``$METACOMPRESS_CACHE`` or ``~/.cache/metacompress``, then the first 16 hex digits of the URI's sha256."""
    base = os.environ.get("METACOMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metacompress")
    return os.path.join(base, hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:16])


def read_bytes(uri: str) -> bytes:
    """The file's bytes; FileNotFoundError naming ``uri`` when it is missing."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Replace the file atomically (parents created)."""
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:  # one PUT: atomic
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def listdir(uri: str) -> list[str]:
    """Sorted names directly under ``uri`` (files and directories); empty when it does not exist."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def delete(uri: str) -> None:
    """Remove a file or a whole directory; nothing when it does not exist."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def files_sha256(uri: str) -> dict[str, str]:
    """{name: sha256} of the files directly in directory ``uri`` (read through its filesystem)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return {name: _sha256(fs, f"{path}/{name}") for name in names}


def file_sha256(uri: str) -> str:
    return _sha256(*resolve(uri))


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return stream_sha256(f)


def copy_dir(src: str, dst: str) -> None:
    """Copy the files of directory ``src`` into ``dst`` (any two URIs; existing files replaced)."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local directory holding ``uri``'s files for the block: ``uri`` itself when local, else a temporary copy."""
    if not is_remote(uri):
        yield uri[len("file://"):] if uri.startswith("file://") else uri
        return
    with tempfile.TemporaryDirectory(prefix="metacompress-") as tmp:
        copy_dir(uri, tmp)
        yield tmp


@contextlib.contextmanager
def staged_dir(uri: str) -> Iterator[str]:
    """A fresh local directory for the block, whose files then replace directory ``uri``. Locally a rename (atomic);
    on an object store the old files are deleted and the new ones uploaded: there the consumer's check of the sha256
    recorded in the stage's ``_SUCCESS`` (docs/design.md §8) is what keeps a half-written directory from use."""
    if not is_remote(uri):
        target = uri[len("file://"):] if uri.startswith("file://") else uri
        head, _, name = target.rstrip("/").rpartition("/")
        tmp = f"{head}/.{name}.tmp-{uuid.uuid4().hex[:12]}"  # hidden: listings of the parent skip it
        os.makedirs(tmp)
        try:
            yield tmp
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="metacompress-") as tmp:
        yield tmp
        delete(uri)
        copy_dir(tmp, uri)
