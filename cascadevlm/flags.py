"""One flag style for every entry point: LightningCLI's ``--a.b_c`` (underscores).

``train.py`` / ``evaluate.py`` and ``python -m cascadevlm.cascade.settings`` are jsonargparse parsers and
spell their flags ``--data.val_limit``, ``--dry_run``. The plain-argparse entry points (``python -m
cascadevlm.data.prepare``, ``cascadevlm.zoo.pretrain``, ``cascadevlm.report.*``) call :func:`one_flag_style`
on their parser, so ``--skip_bad`` works there too; the older dashed spelling (``--skip-bad``) stays an
alias, so earlier commands and scripts keep working.
"""

from __future__ import annotations

import argparse


def underscored(option: str) -> str:
    """``--skip-bad`` -> ``--skip_bad`` (a short option or one without dashes is returned unchanged)."""
    if not option.startswith("--"):
        return option
    return "--" + option[2:].replace("-", "_")


def one_flag_style(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every ``--a-b`` option of ``parser`` the spelling ``--a_b``, shown first in ``--help``; the
    dashed one stays accepted. Call it after the last ``add_argument``; returns ``parser``."""
    for action in parser._actions:
        new = [underscored(s) for s in action.option_strings if underscored(s) != s]
        new = [s for s in new if s not in parser._option_string_actions]
        for option in new:
            parser._option_string_actions[option] = action
        if new:
            action.option_strings = new + [s for s in action.option_strings]
    return parser
