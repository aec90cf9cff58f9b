"""gpu_worker.model.compile_cache without torch: where the cache lives, and what export and import
accept and refuse (the manifest, a foreign machine's archive, paths that leave the folder)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from gpu_worker.model.compile_cache import (
    INDUCTOR_ENV,
    MANIFEST_NAME,
    CompileCacheError,
    cache_dir,
    export_cache,
    import_cache,
    use_compile_cache,
)

HERE = {"torch": "2.13.0", "triton": "none", "cuda": "13.0", "gpu": "NVIDIA H200", "python": "3.12.3",
        "machine": "x86_64"}


def fill(directory, files):
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cache_lives_in_state_dir_unless_torchinductor_cache_dir_says_otherwise(tmp_path):
    environ: dict[str, str] = {}
    directory = use_compile_cache(tmp_path / "state", environ)
    assert directory == tmp_path / "state" / "compile-cache" and directory.is_dir()
    assert environ[INDUCTOR_ENV] == str(directory.resolve())

    chosen = tmp_path / "chosen"
    environ = {INDUCTOR_ENV: str(chosen)}
    assert use_compile_cache(tmp_path / "state", environ) == chosen
    assert environ[INDUCTOR_ENV] == str(chosen.resolve())


def test_an_exported_cache_imports_file_for_file_elsewhere_without_lock_files(tmp_path):
    source = cache_dir(tmp_path / "a")
    fill(source, {"fxgraph/ab/entry": "graph", "triton/0/kernel.cubin": "kernel", "locks/x.lock": "held"})
    archive = tmp_path / "cache.tar.gz"
    assert export_cache(source, archive, HERE) == 2
    target = cache_dir(tmp_path / "b")
    assert import_cache(archive, target, HERE) == 2
    assert (target / "fxgraph/ab/entry").read_text() == "graph"
    assert (target / "triton/0/kernel.cubin").read_text() == "kernel"
    assert not (target / "locks/x.lock").exists()
    assert not (target / MANIFEST_NAME).exists()


def test_exporting_an_empty_cache_says_how_to_fill_it(tmp_path):
    with pytest.raises(CompileCacheError, match="TORCH_COMPILE=true"):
        export_cache(cache_dir(tmp_path), tmp_path / "cache.tar.gz", HERE)


def test_an_archive_from_another_gpu_or_torch_is_refused_with_what_differs_unless_forced(tmp_path):
    source = cache_dir(tmp_path / "a")
    fill(source, {"fxgraph/entry": "graph"})
    archive = tmp_path / "cache.tar.gz"
    export_cache(source, archive, {**HERE, "gpu": "NVIDIA H100", "torch": "2.12.0"})
    target = cache_dir(tmp_path / "b")
    with pytest.raises(CompileCacheError) as refused:
        import_cache(archive, target, HERE)
    assert "gpu: archive 'NVIDIA H100', this host 'NVIDIA H200'" in str(refused.value)
    assert "torch: archive '2.12.0'" in str(refused.value)
    assert not (target / "fxgraph/entry").exists()
    assert import_cache(archive, target, HERE, force=True) == 1


def archive_with(tmp_path, member_name: str):
    archive = tmp_path / "evil.tar.gz"
    manifest = json.dumps({"format": 1, "made_with": HERE, "files": 1}).encode()
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in ((MANIFEST_NAME, manifest), (member_name, b"owned")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_an_archive_cannot_write_outside_the_cache_folder(tmp_path):
    target = cache_dir(tmp_path / "state")
    with pytest.raises(CompileCacheError, match="refused member"):
        import_cache(archive_with(tmp_path, "../outside"), target, HERE)
    assert not (target.parent / "outside").exists()


def test_an_absolute_member_lands_inside_the_cache_folder(tmp_path):
    target = cache_dir(tmp_path / "state")
    outside = tmp_path / "absolute-outside"
    import_cache(archive_with(tmp_path, str(outside)), target, HERE)
    assert not outside.exists()
    assert (target / str(outside).lstrip("/")).read_bytes() == b"owned"


def test_a_file_that_is_not_an_exported_cache_is_refused_readably(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(CompileCacheError, match="not a compile-cache archive"):
        import_cache(junk, cache_dir(tmp_path), HERE)
