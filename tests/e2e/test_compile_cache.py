"""torch.compile's cache, exported on one "host" and imported on another at a different path, with
the real command (python -m gpu_worker.model.compile_cache) and real compiles in fresh processes:
the importing process compiles from the cache (an FX graph cache hit), a process with an empty
STATE_DIR does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

COMPILE_ONCE = textwrap.dedent("""
    import json, sys
    from gpu_worker.model.compile_cache import use_compile_cache
    use_compile_cache(sys.argv[1])
    import torch
    from torch._dynamo.utils import counters
    compiled = torch.compile(lambda x: (x.sin() + x.cos() * 2).relu())
    compiled(torch.randn(8, 8))
    print(json.dumps({k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}))
""")


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    return env


def compile_with(state_dir) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(state_dir)], env=environment(),
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_command(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gpu_worker.model.compile_cache", *args], env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_cache_exported_on_one_host_makes_another_compile_from_it(tmp_path):
    first_host, second_host, empty_host = tmp_path / "a" / "state", tmp_path / "b" / "state", tmp_path / "c" / "state"
    assert compile_with(first_host).get("fxgraph_cache_miss", 0) >= 1  # a cold cache compiles
    archive = tmp_path / "cache.tar.gz"
    assert "exported" in cache_command("export", str(archive), "--state-dir", str(first_host))
    assert "imported" in cache_command("import", str(archive), "--state-dir", str(second_host))

    imported = compile_with(second_host)
    assert imported.get("fxgraph_cache_hit", 0) >= 1 and imported.get("fxgraph_cache_miss", 0) == 0
    assert compile_with(empty_host).get("fxgraph_cache_miss", 0) >= 1  # without the archive it compiles
