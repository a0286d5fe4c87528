"""`python -m levante ...` is `levante ...` (torchrun starts training this way)."""

from levante.cli import main

main()
