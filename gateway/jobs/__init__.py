"""Jobs a client submits and then watches, cancels or is called back for (docs/jobs.md).

* :mod:`gateway.jobs.store`: the job records, their event logs and the webhook outbox, in SQLite
  (one gateway) or Redis (several gateways sharing jobs), behind one interface, ``JobStore``.
* :mod:`gateway.jobs.webhooks`: signing and verifying deliveries (Standard Webhooks headers), the
  ``webhook_events`` filter, the URL guard, the retry backoff and ``WebhookSender``, the background
  task that delivers the outbox.
"""
