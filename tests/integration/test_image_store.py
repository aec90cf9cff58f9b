"""The image folder failing under the gateway, in one process: replaced by a file, stale temp files,
and the pure decisions (the cause a write error names, how long a failure is remembered). A failure
is an answer (503 ``storage_unavailable`` naming the cause and the folder, Retry-After,
X-Request-ID), never a crash, makes /readyz not ready, and serving resumes by itself once the folder
works. Real full and read-only disks (tmpfs) and RLIMIT_FSIZE: tests/e2e/test_image_store.py. The
gateway runs in-process with a fake broker client, which returns real PNGs.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from gateway.config import GatewaySettings
from gateway.images import ImageStore
from tests.support.fake_brokers import RecordingFakeBroker
from tests.support.gateway import start_client
from tests.support.image_folder import assert_storage_503, post


# --------------------------------------------------------------------------- without mount


async def test_image_folder_replaced_by_a_file_answers_503(tmp_path: Path):
    images = tmp_path / "images"
    client = await start_client(GatewaySettings(image_dir=str(images)), RecordingFakeBroker())
    try:
        images.rmdir()
        images.write_bytes(b"not a folder")
        response, body = await post(client)
        assert_storage_503(response, body, ("not a folder",), images)
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["image_store"] == "missing"
        # Put back: served again.
        images.unlink()
        images.mkdir()
        response, body = await post(client)
        assert response.status == 200, body
    finally:
        await client.close()


def test_prune_removes_stale_temp_files_only(tmp_path: Path):
    store = ImageStore(tmp_path / "images", max_count=10, max_age_s=3600)
    now = time.time()
    stale = store.directory / "tmpcrash1.tmp"
    fresh = store.directory / "tmpwriting.tmp"
    stale.write_bytes(b"half an image")
    fresh.write_bytes(b"being written")
    os.utime(stale, (now - 3600, now - 3600))
    kept = store.save("1" * 32, b"\x89PNG")
    store.prune(now=now)
    assert not stale.exists()
    assert fresh.exists() and kept.exists()


# --------------------------------------------------------------------------- the decisions, pure


@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "disk_full"), (errno.EDQUOT, "disk_full"),
                                        (errno.EFBIG, "disk_full"), (errno.EROFS, "read_only"),
                                        (errno.EACCES, "permission"), (errno.EPERM, "permission"),
                                        (errno.ENOENT, "missing"), (errno.ENOTDIR, "missing"),
                                        (errno.EIO, "io_error")])
def test_storage_failure_names_the_cause_and_folder(code, cause):
    from gateway.images import storage_failure

    failure = storage_failure(OSError(code, os.strerror(code)), "/srv/images")
    assert failure.cause == cause
    assert "IMAGE_DIR '/srv/images'" in failure.message


def test_store_health_forgets_a_failure_after_its_memory_or_a_save():
    from gateway.images import StorageFailure, StoreHealth

    health = StoreHealth(memory_s=30)
    full = StorageFailure("disk_full", "full")
    assert health.problem(None, now=0) is None
    health.failed(full, now=100)
    assert health.problem(None, now=129) == full  # a small probe passes, images did not
    assert health.problem(None, now=130) is None  # by itself, so readiness cannot stick
    health.failed(full, now=200)
    health.saved()
    assert health.problem(None, now=201) is None
    probe = StorageFailure("read_only", "ro")
    assert health.problem(probe, now=500) == probe
