"""The ZeroMQ broker: queues gateway requests and balances them over GPU workers."""
