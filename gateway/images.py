"""Generated images on disk: saved under unguessable ids, served by id, pruned by age and count.

A folder that cannot take an image (disk full, read-only, no permission, gone) is an answer, not a
crash: :meth:`ImageStore.save` raises :class:`StorageUnavailable`, whose message names the cause
and the folder, leaves no temp file behind, and the handlers answer 503 ``storage_unavailable``.
:func:`storage_failure` is the decision (which cause for which error); :class:`StoreHealth`
remembers recent failures for /readyz, which also writes a small probe file each time it is asked.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# 32 lowercase hex digits (uuid4): 122 random bits, so ids cannot be guessed, and the pattern
# admits no path separators or dots, so a served name can never leave the image folder.
IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def new_image_id() -> str:
    return uuid.uuid4().hex


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


TEMP_SUFFIX = ".tmp"
# A temp file older than this is left over from a crash (a save takes milliseconds): prune removes it.
STALE_TEMP_S = 600.0
# /readyz's probe: a write this large must succeed for the store to count as writable.
PROBE_BYTES = 64 * 1024
# After a failed save, /readyz reports not ready for this long (unless a save succeeds meanwhile):
# the probe is small, an image is not, so a nearly full disk passes the probe yet fails saves.
FAILURE_MEMORY_S = 30.0


@dataclass(frozen=True)
class StorageFailure:
    """Why the image folder cannot take an image: ``cause`` for programs, ``message`` for people."""

    cause: str  # disk_full, read_only, permission, missing, io_error
    message: str


def storage_failure(exc: OSError, directory: str | os.PathLike) -> StorageFailure:
    """The decision: which cause an OSError met while writing into ``directory`` stands for."""
    where = f"IMAGE_DIR {str(directory)!r}"
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StorageFailure("disk_full", f"{where} is full ({os.strerror(code)}); the image was not kept. "
                                           "Free space there or lower IMAGE_RETENTION_COUNT")
    if code == errno.EFBIG:
        return StorageFailure("disk_full", f"{where}: the image exceeds the file size limit ({os.strerror(code)})")
    if code == errno.EROFS:
        return StorageFailure("read_only", f"{where} is on a read-only file system; the image was not kept")
    if code in (errno.EACCES, errno.EPERM):
        return StorageFailure("permission", f"{where} is not writable by the gateway ({os.strerror(code)})")
    if code in (errno.ENOENT, errno.ENOTDIR):
        return StorageFailure("missing", f"{where} is missing or not a folder ({os.strerror(code)})")
    return StorageFailure("io_error", f"{where} cannot be written: {exc.strerror or exc}")


class StorageUnavailable(Exception):
    """ImageStore.save could not keep the image; the handlers answer 503 storage_unavailable."""

    def __init__(self, failure: StorageFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class StoreHealth:
    """Whether the store takes images, for /readyz: the latest probe, and saves that failed lately."""

    def __init__(self, memory_s: float = FAILURE_MEMORY_S) -> None:
        self.memory_s = memory_s
        self.failed_at: float | None = None
        self.failure: StorageFailure | None = None

    def saved(self) -> None:
        self.failed_at = self.failure = None

    def failed(self, failure: StorageFailure, now: float) -> None:
        self.failed_at, self.failure = now, failure

    def problem(self, probe: StorageFailure | None, now: float) -> StorageFailure | None:
        """What keeps the store from taking images now, or None."""
        if probe is not None:
            return probe
        if self.failed_at is not None and now - self.failed_at < self.memory_s:
            return self.failure
        return None


class ImageStore:
    def __init__(self, directory: str | os.PathLike, max_count: int, max_age_s: float) -> None:
        self.directory = Path(directory)
        self.max_count = max_count
        self.max_age_s = max_age_s
        self.health = StoreHealth()
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, image_id: str) -> Path | None:
        """Where image ``image_id`` lives, or None if the id is not one we could have issued."""
        if not IMAGE_ID.fullmatch(image_id):  # not match(): "$" also matches before a trailing "\n"
            return None
        return self.directory / f"{image_id}.png"

    def save(self, image_id: str, png: bytes, now: float | None = None) -> Path:
        """Write atomically (temp file + rename), so a reader never sees half an image.

        Raises StorageUnavailable (naming the cause and the folder) when the folder cannot take
        it; no temp file is left behind."""
        path = self.path_for(image_id)
        if path is None:
            raise ValueError(f"invalid image id {image_id!r}")
        try:
            self._write(path, png)
        except OSError as exc:
            failure = storage_failure(exc, self.directory)
            self.health.failed(failure, time.monotonic() if now is None else now)
            log.error("cannot keep image %s: %s", image_id, failure.message)
            raise StorageUnavailable(failure) from exc
        self.health.saved()
        return path

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass  # the folder itself is gone or read-only: nothing was left in it either
            raise

    def probe(self) -> StorageFailure | None:
        """Write and delete a PROBE_BYTES file: None if that works, else why not (for /readyz)."""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=TEMP_SUFFIX, prefix="probe")
        except OSError as exc:
            return storage_failure(exc, self.directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(PROBE_BYTES))
            return None
        except OSError as exc:
            return storage_failure(exc, self.directory)
        finally:
            try:
                os.remove(tmp)
            except OSError:
                pass

    def problem(self, now: float | None = None) -> StorageFailure | None:
        """Why the store cannot take images now (probe, or a recent failed save), or None."""
        return self.health.problem(self.probe(), time.monotonic() if now is None else now)

    def read(self, image_id: str) -> bytes | None:
        """Image ``image_id``'s bytes, or None. A symbolic link is never followed (O_NOFOLLOW), and
        only a regular file is served, so nothing placed in the folder can expose a file elsewhere."""
        path = self.path_for(image_id)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None  # absent, or a symbolic link (ELOOP)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None  # a FIFO, device or folder under an image's name
            with os.fdopen(os.dup(fd), "rb") as handle:
                return handle.read()
        finally:
            os.close(fd)

    def prune(self, now: float | None = None) -> int:
        """Delete images older than max_age_s, then the oldest beyond max_count, and temp files a
        crash left behind; returns how many files."""
        now = time.time() if now is None else now
        entries = []
        removed = 0
        try:
            listing = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning("cannot prune: %s", storage_failure(exc, self.directory).message)
            return 0
        for entry in listing:
            if entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False):
                removed += self._remove_stale_temp(entry, now)
            elif entry.name.endswith(".png") and entry.is_file():
                try:
                    entries.append((entry.stat().st_mtime, entry.path))
                except FileNotFoundError:
                    continue
        entries.sort()
        too_old = [p for mtime, p in entries if now - mtime > self.max_age_s]
        remaining = len(entries) - len(too_old)
        excess = [p for _, p in entries[len(too_old):len(too_old) + max(0, remaining - self.max_count)]]
        for path in too_old + excess:
            try:
                os.remove(path)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:  # read-only or not ours: try again next round, keep the loop alive
                log.warning("cannot prune: %s", storage_failure(exc, self.directory).message)
                break
        if removed:
            log.info("pruned %d images from %s", removed, self.directory)
        return removed

    @staticmethod
    def _remove_stale_temp(entry: os.DirEntry, now: float) -> int:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime <= STALE_TEMP_S:
                return 0  # perhaps a save in progress
            os.remove(entry.path)
            return 1
        except OSError:  # gone meanwhile, or the folder is read-only: the next round tries again
            return 0
