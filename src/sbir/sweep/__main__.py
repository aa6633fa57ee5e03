"""``python -m sbir.sweep``. The trial driver lives in :mod:`sbir.sweep.trial`, an importable module, so Ray
pickles it by reference (classes of a ``__main__`` module would travel by value; pydantic models cannot)."""
import sys

from sbir.sweep.cli import main

sys.exit(main())
