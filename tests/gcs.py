"""A real GCS JSON API on localhost, for tests of gs:// workdirs without a network.

`gcp-storage-emulator` (the `gcs` extra) serves one bucket from a temporary folder, with one
gap filled (`serve`): a download also names the object's generation, as GCS does, which
TensorStore keeps to revalidate its cached OCDBT manifest; and an upload honours
`ifGenerationMatch`, which the workdir lease's create-if-absent relies on. gcsfs (what
epath reads and writes gs:// through) finds it by STORAGE_EMULATOR_HOST, TensorStore (Orbax's
arrays) by TENSORSTORE_GCS_HTTP_URL, array_record (TFDS's files) by
CLOUD_STORAGE_EMULATOR_ENDPOINT; none then asks for real credentials. The variables are
set in os.environ, so subprocesses (`python -m lmjax train`) reach the same server.
"""

import contextlib
import http
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

BUCKET = "lmjax-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(port: int) -> dict[str, str]:
    url = f"http://localhost:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GCS_TOKEN": "anon",  # fsspec's config for gcsfs: no credential lookup
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}  # array_record's own GCS client (TFDS)


@contextlib.contextmanager
def emulator(folder: str):
    """Start the server with its data under `folder`, point this process at it, stop it after."""
    port, log = free_port(), open(os.path.join(folder, "emulator.log"), "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, __file__, "start", f"--port={port}", f"--default-bucket={BUCKET}",
         "--quiet"],
        env={**os.environ, "STORAGE_BASE": folder, "STORAGE_DIR": "buckets"},
        stdout=log, stderr=log)  # a file: a full pipe would stall the server
    try:
        _wait_until_up(port, server, log.name)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in environment(port).items():
                patch.setenv(key, value)
            import fsspec

            patch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
            yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _wait_until_up(port: int, server: subprocess.Popen, log: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited: {open(log).read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://localhost:{port}/storage/v1/b/{BUCKET}", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"gcp-storage-emulator did not answer on port {port} in {timeout} s")


def serve(args: list[str]) -> None:
    """The emulator's `start`, its downloads carrying x-goog-generation: without it TensorStore
    reads generation 0 and its next conditional read of the manifest fails ('Malformed
    StorageGeneration', one save in a few)."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def with_generation(request, response, storage, *rest, **kwargs):
        download(request, response, storage, *rest, **kwargs)
        if response.status in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    insert, lock = objects.insert, threading.Lock()

    def with_precondition(request, response, storage, *rest, **kwargs):
        """GCS's create-if-absent (`ifGenerationMatch=0`, what gcsfs sends for mode="create"):
        a 412 when the object exists. The emulator ignores the condition; the lease needs it."""
        wanted = request.query.get("ifGenerationMatch", [None])[0]
        with lock:  # the check and the write as one step, as the real service does
            if wanted is not None:
                name = (request.query.get("name") or [None])[0]
                if name is None and isinstance(request.data, dict):
                    name = (request.data.get("meta") or request.data).get("name")
                try:
                    now = storage.get_file_obj(request.params["bucket_name"], name)["generation"]
                except Exception:  # noqa: BLE001 - the emulator's NotFound: no object yet
                    now = "0"
                if str(now) != wanted:
                    response.status = http.HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet",
                                             "errors": [{"reason": "conditionNotMet"}]}})
                    return None
            return insert(request, response, storage, *rest, **kwargs)

    objects.download = with_generation  # before server.py builds its routes from them
    objects.insert = with_precondition
    from gcp_storage_emulator.__main__ import main

    main(args)


if __name__ == "__main__":
    serve(sys.argv[1:])
