"""What the tools' ``--help`` shares: every option's default, shown the same way.

Light on purpose (argparse only): the tools build their parsers before importing torch, so
``--help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to each option's help, except where there is no value to show (None:
    the help says in words what happens; a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
