"""Subcommands of `tttlm`, one module each (see `tttlm.cli`)."""
