"""lmtune's version (the ground floor: recorded in every run folder and model folder)."""

__version__ = "0.1.0"
