"""Launching a cluster: the supervisord configuration and the GPUs it pins workers to."""
