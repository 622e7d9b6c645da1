"""`python -m dictionary_learning ...`: see dictionary_learning/cli.py."""

from .cli import main

main()
