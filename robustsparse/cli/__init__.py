"""The command line (``robustsparse COMMAND``): ``main.py`` holds the parser and the core commands; ``bench``,
``export``, ``posttrain`` and ``sweep`` each add their own subcommand. Entry point: ``robustsparse.cli:main``."""
from .main import main

__all__ = ["main"]
