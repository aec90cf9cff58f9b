"""torch.compile's cache, kept in STATE_DIR, and carried to a new host as one archive.

A compiled worker spends minutes at its first start compiling the UNet, the VAE decoder and the
text encoders (on an H200, SD-1.5 at batch 16 and its CUDA graphs at batch 1: about 3 minutes).
torch keeps what it compiled in an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``: generated code, the
compiled graphs, Triton kernels, autotuning results) and, with a warm cache, recompiles the same
graphs in seconds. Left to torch, that cache lives in the system's temporary folder, which a reboot
or a tmp cleaner empties; here it lives in ``STATE_DIR/compile-cache`` (:func:`use_compile_cache`),
beside the service's other state.

A new host with the same GPU model and the same software (torch, Triton, CUDA, Python) can start
from another host's cache::

    python -m gpu_worker.model.compile_cache export cache.tar.gz     # on a host whose worker has started
    python -m gpu_worker.model.compile_cache import cache.tar.gz     # on the new host, before its worker starts

The archive carries a manifest of the software and GPU it was made with; importing it on a host
that differs is refused with what differs (``--force`` imports it anyway: torch checks every entry's
key and compiles again whatever does not match, so a mismatched cache costs time, never correctness).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import tarfile
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

CACHE_SUBDIR = "compile-cache"  # under STATE_DIR
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
MANIFEST_NAME = "imagegen-compile-cache.json"  # the archive's first member
ARCHIVE_FORMAT = 1


class CompileCacheError(Exception):
    """An archive that cannot or should not be imported here; the message says why and what to do."""


def cache_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / CACHE_SUBDIR


def use_compile_cache(state_dir: str | os.PathLike, environ: dict[str, str] | None = None) -> Path:
    """Point torch's compile cache at STATE_DIR/compile-cache (created if missing) and return it.

    An explicit ``TORCHINDUCTOR_CACHE_DIR`` wins (an operator who set it chose it). torch reads the
    variable when it first compiles, not at import, so calling this before loading the model is
    enough."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(INDUCTOR_ENV)
    directory = Path(explicit) if explicit else cache_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    environ[INDUCTOR_ENV] = str(directory.resolve())
    return directory


def holds_artefacts(directory: Path) -> bool:
    """Whether torch has written anything to the cache (False: a cold start, compiling takes minutes).
    Looks at one entry only: a warm cache holds thousands of files, and this runs at every start."""
    return directory.is_dir() and next(directory.iterdir(), None) is not None


def fingerprint() -> dict[str, str]:
    """What a compiled artefact depends on: a cache made elsewhere is only useful where these match."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    on_cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "gpu": torch.cuda.get_device_name(0) if on_cuda else "none",
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def differences(made_with: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Each field of the manifest that differs from this host's, readably ("gpu: A != B")."""
    return [f"{name}: archive {made_with.get(name)!r}, this host {here[name]!r}"
            for name in sorted(here) if made_with.get(name) != here[name]]


def export_cache(directory: Path, archive: Path, made_with: Mapping[str, str]) -> int:
    """Write ``directory``'s files to a gzip'd tar at ``archive`` with a manifest first; returns the
    number of files. Lock files are left out (they belong to a running process)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    if not files:
        raise CompileCacheError(f"{directory} holds no compiled artefacts: start a worker with TORCH_COMPILE=true "
                                "and the same STATE_DIR first, then export")
    manifest = json.dumps({"format": ARCHIVE_FORMAT, "made_with": dict(made_with), "files": len(files)}).encode()
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for path in files:
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return len(files)


def read_manifest(archive: Path) -> dict[str, Any]:
    """The manifest, read from the archive's first member (``export`` writes it first), so the
    archive is not decompressed to its end once to find it and again to unpack it."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            first = tar.next()
            member = tar.extractfile(first) if first is not None and first.name == MANIFEST_NAME else None
            manifest = json.loads(member.read()) if member is not None else None
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise CompileCacheError(f"{archive} is not a compile-cache archive made by `export` ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise CompileCacheError(f"{archive} has no manifest of format {ARCHIVE_FORMAT}: export it again with this version")
    return manifest


def import_cache(archive: Path, directory: Path, here: Mapping[str, str], force: bool = False) -> int:
    """Unpack ``archive`` into ``directory`` (merged with what is there); returns the number of files.

    Refused when the archive was made with other software or another GPU, unless ``force``. Members
    are unpacked with tarfile's "data" filter: no absolute paths, no ``..``, no links out of the
    folder, no device files, so an archive cannot write outside the cache."""
    manifest = read_manifest(archive)
    differ = differences(manifest.get("made_with", {}), here)
    if differ and not force:
        raise CompileCacheError("the archive was made with other software or another GPU, so torch would compile "
                                "again anyway: " + "; ".join(differ) + " (--force imports it regardless)")
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.name == MANIFEST_NAME:
                continue
            try:
                tar.extract(member, directory, filter="data")
            except tarfile.FilterError as exc:
                raise CompileCacheError(f"{archive}: refused member {member.name!r} ({exc})") from exc
            count += member.isfile()
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker.model.compile_cache",
                                     description="Export or import torch.compile's cache (STATE_DIR/compile-cache).")
    parser.add_argument("action", choices=("export", "import"))
    parser.add_argument("archive", type=Path, help="the .tar.gz to write (export) or read (import)")
    parser.add_argument("--state-dir", default=os.environ.get("STATE_DIR", "state"),
                        help="the workers' STATE_DIR (default: $STATE_DIR, else ./state)")
    parser.add_argument("--force", action="store_true", help="import an archive made with other software or GPU")
    args = parser.parse_args(argv)
    directory = Path(os.environ.get(INDUCTOR_ENV) or cache_dir(args.state_dir))
    try:
        if args.action == "export":
            count = export_cache(directory, args.archive, fingerprint())
            print(f"exported {count} files from {directory} to {args.archive} "
                  f"({args.archive.stat().st_size / 2**20:.1f} MiB)")
        else:
            count = import_cache(args.archive, directory, fingerprint(), args.force)
            print(f"imported {count} files into {directory}: workers started with this STATE_DIR compile from them")
    except CompileCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
