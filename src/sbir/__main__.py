"""``python -m sbir``: the same command as ``sbir`` (see :mod:`sbir.cli`)."""
from sbir.cli import entry

entry()
