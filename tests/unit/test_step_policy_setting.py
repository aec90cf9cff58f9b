"""BATCH_POLICY=step: the worker's settings take it (the step loop runs it), and it is not a batcher."""

from __future__ import annotations

import pytest

from gpu_worker.config import WorkerSettings
from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.decisions.policies import DEFAULT, STEP, make_batcher
from imagegen import settings as settings_lib


def test_the_worker_settings_take_the_step_policy_and_keep_run_to_completion_the_default():
    assert settings_lib.load(WorkerSettings, [], {"BATCH_POLICY": "step"}).batch_policy == STEP
    assert settings_lib.load(WorkerSettings, [], {}).batch_policy == DEFAULT == "run-to-completion"


def test_an_unknown_policy_is_refused_naming_step_among_the_choices():
    with pytest.raises(settings_lib.SettingsError, match="BATCH_POLICY: must be one of .*step"):
        settings_lib.load(WorkerSettings, [], {"BATCH_POLICY": "steps"})


def test_step_is_not_a_batcher():
    with pytest.raises(ValueError, match="not a batcher"):
        make_batcher(STEP, BatchPolicyConfig())
