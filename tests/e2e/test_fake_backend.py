"""The FAKE image backend (gpu_worker.model.fake_backend) seen from other interpreters: the same
pixels in another process, and importing it pulls in no diffusers (tests/unit/test_fake_backend.py
checks the fake itself)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from gpu_worker.model.fake_backend import FakeBackend
from gpu_worker.model.pipelines import GenerationJob
from imagegen.batch_key import BatchKey
from tests.support.images import pixels
from tests.support.paths import REPO

SETTINGS = BatchKey(64, 64, 2, 7.5)


def test_images_are_deterministic_across_processes():
    # sha256, not Python's salted hash(): another interpreter gets the same pixels.
    code = ("import hashlib, numpy as np\n"
            "from gpu_worker.model.fake_backend import FakeBackend\n"
            "from gpu_worker.model.pipelines import GenerationJob\n"
            "from imagegen.batch_key import BatchKey\n"
            "img = FakeBackend().generate([GenerationJob('a cat', None, 7)], "
            "BatchKey(64, 64, 2, 7.5))[0]\n"
            "print(hashlib.sha256(np.asarray(img).tobytes()).hexdigest())\n")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env, cwd=REPO)
    here = FakeBackend().generate([GenerationJob("a cat", None, 7)], SETTINGS)[0]
    assert out.stdout.strip() == hashlib.sha256(pixels(here)).hexdigest()


def test_import_is_cheap_no_diffusers():
    code = ("import sys, gpu_worker.model.fake_backend, gpu_worker.model.oom\n"
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
