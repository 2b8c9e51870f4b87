"""``python -m lmtune`` (also what ``accelerate launch -m lmtune`` runs)."""

from lmtune.cli import main

main()
