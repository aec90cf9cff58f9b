"""The image folder failing for real under the gateway: a 5 MB tmpfs filled to the brim and remounted
read-only (needs root and mount(2); skipped with the reason otherwise), and RLIMIT_FSIZE in a
subprocess (no mount needed). Each failure is an answer (503 ``storage_unavailable`` naming the
cause and the folder, Retry-After, X-Request-ID), never a crash, leaves no temp file, makes /readyz
not ready, and serving resumes by itself once the folder works. The gateway runs in-process with a
fake broker client that returns real PNGs; the mounts and the limited writer are processes. The
cases needing neither: tests/integration/test_image_store.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewaySettings
from gateway.images import ImageStore
from tests.support.fake_brokers import RecordingFakeBroker
from tests.support.gateway import start_client
from tests.support.image_folder import assert_storage_503, post, temp_files
from tests.support.paths import REPO


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its file system has no space left."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with open(filler, "ab", buffering=0) as handle:  # the last partial page too
        try:
            while True:
                handle.write(b"\0" * 512)
        except OSError:
            pass
    return filler


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 5 MB tmpfs mounted at a fresh folder, unmounted afterwards."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount(2)): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_full_then_read_only_tmpfs_answers_503_and_recovers(tmpfs: Path):
    images = tmpfs / "images"
    broker = RecordingFakeBroker()
    client = await start_client(GatewaySettings(image_dir=str(images)), broker)
    try:
        response, body = await post(client)
        assert response.status == 200, body  # works while there is room

        filler = fill(tmpfs)
        response, body = await post(client)
        assert_storage_503(response, body, ("full",), images)
        assert temp_files(images) == []
        ready = await client.get("/readyz")
        assert ready.status == 503
        readiness = await ready.json()
        assert readiness["status"] == "not_ready" and "full" in readiness["reason"], readiness
        assert readiness["image_store"] == "disk_full"

        # The OpenAI route: its own error shape, same code; b64_json stores nothing, so it still works.
        response, body = await post(client, "/v1/images/generations", {"prompt": "p", "size": "64x64"})
        assert response.status == 503 and body["error"]["code"] == "storage_unavailable", body
        assert body["error"]["type"] == "server_error" and str(images) in body["error"]["message"]
        response, body = await post(client, "/v1/images/generations",
                                    {"prompt": "p", "size": "64x64", "response_format": "b64_json"})
        assert response.status == 200 and body["data"][0]["b64_json"], body
        assert temp_files(images) == []

        # Space returns: serving resumes by itself.
        filler.unlink()
        response, body = await post(client)
        assert response.status == 200, body
        assert (await client.get("/readyz")).status == 200

        # Read-only: the same answer, naming that cause.
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        response, body = await post(client)
        assert_storage_503(response, body, ("read-only",), images)
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["image_store"] == "read_only"
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
        response, body = await post(client)
        assert response.status == 200, body
    finally:
        await client.close()


def test_file_size_limit_in_a_subprocess_leaves_no_temp_file(tmp_path: Path):
    """RLIMIT_FSIZE makes write() fail (EFBIG) like a full disk, in a process of its own."""
    script = r"""
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing write()
from gateway.images import ImageStore
store = ImageStore(sys.argv[1], 10, 3600)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    store.save("0" * 32, b"x" * 100000)
    print(json.dumps({"raised": None}))
except Exception as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc),
                      "cause": getattr(getattr(exc, "failure", None), "cause", None)}))
"""
    folder = tmp_path / "images"
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["raised"] == "StorageUnavailable", outcome
    assert outcome["cause"] == "disk_full" and str(folder) in outcome["message"], outcome
    assert temp_files(folder) == [] and not (folder / f"{'0' * 32}.png").exists()


async def test_pruning_a_read_only_folder_does_not_raise(tmpfs: Path):
    """The prune loop runs every minute for the gateway's life: an error would end it for good."""
    store = ImageStore(tmpfs / "images", max_count=1, max_age_s=3600)
    for index in range(3):
        store.save(f"{index:032d}", b"\x89PNG")
    (store.directory / "tmpcrash.tmp").write_bytes(b"half")
    os.utime(store.directory / "tmpcrash.tmp", (0, 0))
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        assert store.prune() == 0  # nothing removable, and no exception
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert store.prune() == 3  # two images beyond max_count and the stale temp file
