"""The measurement harness: what the figures in docs/benchmarks.md, docs/scale-out.md,
docs/reliability.md and docs/scheduling.md were measured with. Each module runs as
``python -m bench.NAME ...`` from the repository root (``--help`` shows its arguments); the service
itself and its load test are in scripts/.

* ``gpu``: one GPU, one call: the raw pipeline per optimisation and batch size, then the whole
  service on the same card, and the summary rows of docs/benchmarks.
* ``service``: the whole service (broker, gateway, one worker per GPU) under the load test:
  scale-out over GPU counts, or one GPU's lone request, burst and users.
* ``batch_costs``: the worker's own batch call per batch size, for the simulator's cost model.
* ``batch_size_table``: the automatic MAX_BATCH_SIZE per card against the memory measured per image.
* ``profile_batch``: where one batch's time goes, phase by phase (and where the CPU waits for the GPU).
* ``unet_variants``: which way of running the UNet and the VAE decoder is fastest on a card.
* ``throttle_ab``: what the worker's wait before each denoising step costs a lone request.
* ``png``: the worker's PNG encoder against PIL and an earlier version of itself.
* ``trace_stages``: the median milliseconds of each hop of a request, from a stage trace.
* ``broker_ceiling``: how many requests per second one broker routes, and its CPU per request.
* ``curve``: what CurveZMQ encryption costs per image on the worker link.
* ``overload``: backpressure at ten times the service's capacity (503 + Retry-After, bounded memory).
* ``jobs_load``: 1,000 jobs at once through the job API, each followed by its event stream: every job
  ends, every listener gets its terminal event, and the gateway's memory and open files.
* ``abandon_probe``: how soon work nobody waits for frees the GPU, against a running service.
* ``compile_cache``: how soon a compiled worker is ready: cold, restarted, and from an imported cache.
* ``resolutions``: every listed size at compiled speed (burst, square-only and mixed Poisson traffic,
  lone requests against the raw batch of one) and the ready times: cold, restarted, imported cache.
* ``step_policy``: BATCH_POLICY=step beside run-to-completion through the service, in one call: lone,
  burst, users, staggered and mixed-steps arrivals, the ratios and the issue's targets.
* ``common``: what the modules share: the card's name, the saved result, the benchmark batch.
* ``local_service``: broker, gateway and one worker as subprocesses on loopback, started and stopped
  by process group, for the harnesses that load the whole service over HTTP (jobs_load, overload).

``compare_serving.sh`` (a shell script here, not a module) is an A/B of the serving path against
another checkout, on the FAKE backend.
"""
