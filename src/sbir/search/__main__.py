"""``python -m sbir.search ...`` == ``sbir search ...``."""
import sys

from sbir.cli import main

sys.exit(main(["search", *sys.argv[1:]]))
