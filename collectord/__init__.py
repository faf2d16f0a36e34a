"""collectord: the supervisor side. Knows ChildSpecs, never a collector class."""

__version__ = "0.1.0"
