"""The worker's decisions: pure, clock-injected classes (no torch, no sockets, no asyncio)."""
