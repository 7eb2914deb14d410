"""`python -m qcowfast` runs the command line."""
from ._entry import run

run()
