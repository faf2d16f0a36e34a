"""`python -m polysim` is the `polysim` console script."""

from polysim.cli import main

raise SystemExit(main())
