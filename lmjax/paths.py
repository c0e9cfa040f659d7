"""Every user-given location as an `etils.epath.Path`, so that `gs://bucket/run` works wherever a
local folder does.

epath is what Orbax itself uses: a local path is a `pathlib.Path`, a URL goes through fsspec
(gcsfs for gs://, the `gcs` extra). What epath lacks is here: a URL kept intact (os.path.abspath
turns gs://b/r into <cwd>/gs:/b/r), and copying a local folder up, for the writers that can only
write local files (tensorboardX without TensorFlow, the JAX profiler). An object store has no
append and no cheap rename of a folder, so the helpers below write whole objects.
"""

import glob as stdlib_glob
import os
import pathlib
import secrets

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for `scheme://...` (gs://, s3://, ...): a location no local file call can reach."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """A URL as it is; a local path expanded (~) and made absolute, so a later chdir cannot
    move it."""
    if is_url(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def upload_tree(local: PathLike, remote: epath.Path) -> None:
    """Copy every file under the local folder `local` to the same place under `remote`, each
    file whole (an object is written at once or not at all)."""
    for file in pathlib.Path(local).rglob("*"):  # epath refuses `**` on any path
        if file.is_file():
            target = remote / file.relative_to(local)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())


def move(source: epath.Path, target: epath.Path) -> None:
    """Move a file or folder. A bucket has no folders to rename (epath's rename refuses a target
    folder that holds no object yet): there every object is copied in the store, then deleted."""
    if not is_url(source):
        source.rename(target)
        return
    import fsspec

    fs, source_path = fsspec.core.url_to_fs(os.fspath(source))
    fs.copy(source_path, fs._strip_protocol(os.fspath(target)), recursive=True)
    fs.rm(source_path, recursive=True)


def create_new(path: epath.Path, data: bytes) -> bool:
    """Write `path` whole if no file is there yet; False if one is. Atomic on both kinds of
    store, content included (a reader never sees it empty): a temporary file hard-linked into
    place on a disk (link refuses an existing name), `ifGenerationMatch=0` on a bucket."""
    if is_url(path):
        import fsspec

        fs, key = fsspec.core.url_to_fs(os.fspath(path))
        try:
            fs.pipe_file(key, data, mode="create")
        except FileExistsError:
            return False
        return True
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    temporary.write_bytes(data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink()
    return True


def glob(pattern: PathLike) -> list[epath.Path]:
    """The files (not folders) matching `pattern`, sorted; `**` spans any depth of folders on a
    disk and in a bucket alike (epath's own glob refuses `**` on gs://). A local pattern has `~`
    expanded."""
    pattern = os.fspath(pattern)
    if not is_url(pattern):
        found = stdlib_glob.glob(os.path.expanduser(pattern), recursive=True)
        return sorted(epath.Path(p) for p in found if os.path.isfile(p))
    import fsspec

    fs, key = fsspec.core.url_to_fs(pattern)
    found = fs.glob(key, detail=True)  # one listing per folder, with each entry's type
    return sorted(epath.Path(fs.unstrip_protocol(name)) for name, info in found.items()
                  if info["type"] == "file")


def check_folder(path: PathLike, what: str) -> None:
    """Raise one sentence if the local folder `path` cannot be made because it, or a folder
    above it, is a file: mkdir would fail deep inside whichever library writes there first. A
    bucket has no such files standing in for folders."""
    if is_url(path):
        return
    path = resolve(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"lies inside {folder}, which is a file"
                raise NotADirectoryError(f"{what} {path} {where}, not a folder.")
            return
