"""``python -m sbir``: the same command as ``sbir`` (see :mod:`sbir.cli`)."""
import sys

from sbir.cli import main

sys.exit(main())
