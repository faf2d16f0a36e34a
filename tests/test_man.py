"""`man collectord` after `pip install`: the page generated from the parser, installed where man looks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PAGE = Path(sys.prefix) / "share" / "man" / "man1" / "collectord.1"


def test_the_installed_man_page_has_a_name_line_and_its_sections():
    assert PAGE.is_file(), f"no {PAGE}: the install did not place the man page (setup.cfg data_files)"
    text = PAGE.read_text()
    name = text.split(".SH NAME\n", 1)[1].splitlines()[0]
    assert name == r"collectord \- record Polymarket market data into PostgreSQL under a forking supervisor"
    for section in ("SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "FILES", "ENVIRONMENT", "EXAMPLES", "SEE ALSO"):
        assert f"\n.SH {section}\n" in text, section
    exit_status = text.split("\n.SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    assert [line[3:] for line in exit_status.splitlines() if line.startswith(".B ")] == [
        "0", "1", "2", "3", "4", "6", "78", "130"]
    assert "COLLECTORD_CONFIG" in text.split("\n.SH ENVIRONMENT\n", 1)[1]
    assert "'collectord db serve'" in text  # generated from today's parser, not a stale copy
    assert "'collectord export'" in text


def test_man_finds_it_through_the_venvs_bin_on_path():
    man = shutil.which("man")
    if man is None:
        import pytest

        pytest.skip("man is not installed here")
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin"
    r = subprocess.run([man, "-w", "collectord"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == PAGE.resolve()
