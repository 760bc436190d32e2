"""`python -m saelab ...`: the `saelab` command, also as torchrun runs it (`torchrun -m saelab train CONFIG`)."""

from saelab.cli import app

app()
