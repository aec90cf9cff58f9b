"""The package layout is the architecture: the broker is not built on the worker's code."""

from __future__ import annotations


def test_the_worker_still_offers_the_shared_names_where_its_modules_used_them():
    from gpu_worker.decisions.batcher import BatchKey as batcher_key
    from gpu_worker.decisions.cost_model import work_units as cost_model_units
    from imagegen.batch_key import BatchKey, work_units

    assert batcher_key is BatchKey and cost_model_units is work_units
