"""The distortion parameters at levels 1..5, read from src/distort/levels.toml, the table
`streamiq distort` is built with (one source for both).

TABLES: {kind: [5 parameters]} of the standard kinds, in `Kind::ALL` order; KINDS: their
names in that order (the training data's kind index); EXTRA_TABLES: the kinds held out of
the default set (never trained on)."""
import tomllib
from pathlib import Path

LEVELS_TOML = Path(__file__).resolve().parents[2] / "src" / "distort" / "levels.toml"


def read_levels(path=LEVELS_TOML):
    """(standard, extra) parameter tables of a levels file."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    return doc["levels"], doc["extra_levels"]


TABLES, EXTRA_TABLES = read_levels()
KINDS = list(TABLES)
