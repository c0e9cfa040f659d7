"""Every user-given location as an `etils.epath.Path`, so that `gs://bucket/run` works wherever a
local folder does.

epath is what Orbax itself uses: a local path is a `pathlib.Path`, a URL goes through fsspec
(gcsfs for gs://, the `gcs` extra). What epath lacks is here: a URL kept intact (os.path.abspath
turns gs://b/r into <cwd>/gs:/b/r), and copying a local folder up, for the writers that can only
write local files (tensorboardX without TensorFlow, the JAX profiler). An object store has no
append and no cheap rename of a folder, so the helpers below write whole objects.
"""

import os
import pathlib

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
