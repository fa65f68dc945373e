"""Subcommands of the ``perceiver-ar`` CLI, one module each (see perceiver_ar.cli)."""
