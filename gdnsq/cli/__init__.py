"""The ``gdnsq`` command (argparse only); see :mod:`gdnsq.cli.main`."""

from .main import main as main
