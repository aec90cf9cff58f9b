"""Jobs a client submits and then watches, cancels or is called back for (docs/jobs.md).

* :mod:`gateway.jobs.store`: the job records, their event logs and the webhook outbox, in SQLite
  (one gateway) or Redis (several gateways sharing jobs), behind one interface, ``JobStore``.
* :mod:`gateway.jobs.webhooks`: signing and verifying deliveries (Standard Webhooks headers), the
  ``webhook_events`` filter, the URL guard, the retry backoff and ``WebhookSender``, the background
  task that delivers the outbox.
* :mod:`gateway.jobs.runner`: ``JobRunner``, each job's request at the broker and the events,
  status and end it records; ``EventHub``, the wake-ups and bounds of the event streams.
* :mod:`gateway.jobs.routes`: the HTTP routes (POST /v1/jobs, GET and DELETE /v1/jobs/{id},
  GET /v1/jobs/{id}/events) and ``setup_jobs``, which adds them to the gateway's app.
"""
