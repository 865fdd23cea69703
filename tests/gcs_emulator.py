"""A GCS API server on loopback for the bucket tests: ``gcp-storage-emulator`` plus generation preconditions.

usage: python gcs_emulator.py PORT BUCKET
Prints ``READY <port>`` once it serves, then runs until killed.

The emulator speaks the JSON API that gcsfs and TensorStore use, but ignores the
``ifGenerationMatch`` precondition that real GCS enforces, and the run lock and the atomic writes
rely on it (a create with ``ifGenerationMatch=0`` fails with 412 when the object exists). This
wrapper adds exactly that rule, as GCS documents it: a write or delete carrying
``ifGenerationMatch=G`` (query parameter or ``x-goog-if-generation-match`` header) succeeds only if
the object's live generation is ``G`` (``0``: the object does not exist); otherwise 412.
Media downloads also carry the ``x-goog-generation`` header GCS sends (TensorStore conditions its
OCDBT manifest writes on it). It also serves one request at a time from a deeper listen queue (TensorStore opens many connections).
"""

from __future__ import annotations

import http.server
import sys
import threading
import time
from urllib.parse import parse_qs, urlparse

from gcp_storage_emulator import server, storage
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.exceptions import NotFound

_precondition = threading.local()


class PreconditionFailed(Exception):
    pass


def _live_generation(store: storage.Storage, bucket: str, name: str) -> str:
    try:
        return str(store.get_file_obj(bucket, name).get("generation") or "0")
    except NotFound:
        return "0"


def _check(store: storage.Storage, bucket: str, name: str) -> None:
    want = getattr(_precondition, "generation", None)
    if want is not None and _live_generation(store, bucket, name) != want:
        raise PreconditionFailed(f"{bucket}/{name}: generation is not {want}")


_create_file, _delete_file = storage.Storage.create_file, storage.Storage.delete_file


def create_file(self, bucket_name, file_name, *args, **kwargs):
    _check(self, bucket_name, file_name)
    return _create_file(self, bucket_name, file_name, *args, **kwargs)


def delete_file(self, bucket_name, file_name, *args, **kwargs):
    _check(self, bucket_name, file_name)
    return _delete_file(self, bucket_name, file_name, *args, **kwargs)


storage.Storage.create_file, storage.Storage.delete_file = create_file, delete_file
_handle = server.Router.handle


def handle(self, method):
    request = self._request_handler
    query = parse_qs(urlparse(request.path).query)
    want = (query.get("ifGenerationMatch") or [request.headers.get("x-goog-if-generation-match")])[0]
    if query.get("uploadType", [""])[0] == "resumable" or "upload_id" in query:
        want = None  # GCS checks it when a resumable upload completes; nothing here relies on that
    _precondition.generation = want
    try:
        _handle(self, method)
    except PreconditionFailed as e:
        body = f'{{"error": {{"code": 412, "message": "Precondition Failed: {e}"}}}}'.encode()
        request.send_response(412)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
    finally:
        _precondition.generation = None


server.Router.handle = handle
_download = objects.download


def download(request, response, store, *args, **kwargs):
    """A media download carries the object's generation in ``x-goog-generation``, as GCS does:
    TensorStore reads it there, and conditions its next write (an OCDBT manifest) on it."""
    _download(request, response, store, *args, **kwargs)
    try:
        obj = store.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = str(obj.get("generation") or "0")
    response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")


objects.download = download
for _route, _methods in server.HANDLERS:
    for _method, _fn in list(_methods.items()):
        if _fn is _download:
            _methods[_method] = download
http.server.HTTPServer.request_queue_size = 256


if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.start()
    print(f"READY {port}", flush=True)
    while True:
        time.sleep(3600)
