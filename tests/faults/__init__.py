"""Faults and load: nothing lost, nothing left behind, no way in (issue 9)."""
