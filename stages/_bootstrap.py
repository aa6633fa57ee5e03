"""Put src/ on sys.path so stages run from a plain checkout too (the venv installs sbir editable)."""
import sys
from pathlib import Path

_src = str(Path(__file__).resolve().parents[1] / "src")
if _src not in sys.path:
    sys.path.insert(0, _src)
