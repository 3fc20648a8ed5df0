"""`python -m flatstack` (what torchrun starts: `torchrun ... -m flatstack train ...`) is the CLI."""

from flatstack.cli import run

run()
