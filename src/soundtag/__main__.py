"""`python -m soundtag`: the command line."""

from .cli import main_exit

main_exit()
