"""A DNS resolver for aiohttp that answers from a table, in this process (no DNS): the webhook URL
guard's tests use it for names that resolve to chosen addresses, or change between lookups."""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver


class FakeResolver(AbstractResolver):
    """Answers each name with the next address of its list (a name that rebinds between lookups)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = {name: list(addresses) for name, addresses in answers.items()}
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"{host}: name or service not known")
        address = self.answers[host].pop(0) if len(self.answers[host]) > 1 else self.answers[host][0]
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self):
        pass
