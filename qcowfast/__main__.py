"""`python -m qcowfast` runs the command line."""
from .cli import run

run()
