"""gateway/serving.py raise_open_files_limit: the soft limit on open files is raised at start so that
GATEWAY_MAX_CONNECTIONS connections fit beside the gateway's own files, never past the hard limit."""

from __future__ import annotations

import resource

from gateway.serving import OWN_FILES, raise_open_files_limit


class Limits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and limits[1] == self.hard and limits[0] <= self.hard
        if self.refuse:
            raise ValueError("not allowed")
        self.soft = limits[0]


def test_a_soft_limit_of_1024_is_raised_to_what_the_connections_need():
    limits = Limits(1024, 524288)
    assert raise_open_files_limit(1000, limits.get, limits.set) == (1024, 1000 + OWN_FILES, 1000 + OWN_FILES)
    assert limits.soft == 1000 + OWN_FILES


def test_the_hard_limit_bounds_it_and_a_higher_soft_limit_is_kept():
    limits = Limits(1024, 1050)
    assert raise_open_files_limit(1000, limits.get, limits.set) == (1024, 1050, 1000 + OWN_FILES)
    limits = Limits(65536, 65536)
    assert raise_open_files_limit(1000, limits.get, limits.set) == (65536, 65536, 1000 + OWN_FILES)
    limits = Limits(resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert raise_open_files_limit(1000, limits.get, limits.set)[1] == resource.RLIM_INFINITY


def test_a_refused_raise_leaves_the_limit_as_it_was():
    limits = Limits(1024, 4096, refuse=True)
    assert raise_open_files_limit(1000, limits.get, limits.set) == (1024, 1024, 1000 + OWN_FILES)
