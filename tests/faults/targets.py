"""Collector targets for fault runs (named in a config as tests.faults.targets:Class)."""

from __future__ import annotations

import time


class ExitConfig:
    """A collector that finds its configuration unusable: exits 78 (EX_CONFIG) after a moment."""

    def __init__(self, **kwargs):
        self._stop = False

    def run(self) -> None:
        time.sleep(0.3)
        raise SystemExit(78)

    def stop(self) -> None:
        self._stop = True
