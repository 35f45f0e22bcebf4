"""``python -m qrs``: the same command line as ``qrs`` (and the entry point for torchrun)."""

from qrs.cli import main

main()
