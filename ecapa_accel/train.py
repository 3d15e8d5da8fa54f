"""Entry module for `accelerate launch -m ecapa_accel.train CONFIG --run-dir DIR [KEY=VALUE ...]`.

The loop lives in `trainer.py`; `ecapa_accel.train` stays that function even after this module is imported
(see `ecapa_accel/__init__.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def main(
    config: Path = typer.Argument(..., help="YAML config (see recipes/)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run directory; a run already there is resumed."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides.", show_default=False),
) -> None:
    """Train (or resume) one run in every process that the launcher starts."""
    from ecapa_accel.config import load_config
    from ecapa_accel.trainer import train

    train(load_config(config, overrides), run_dir)


if __name__ == "__main__":
    import signal

    from ecapa_accel.exits import exit_with_status
    from ecapa_accel.launch import die_with_parent

    # A rank gets SIGTERM (checkpoint, stop) if its launcher dies, so it never outlives it; `ecapa-accel launch`
    # starts the launcher with SIGTERM/SIGINT blocked, and a rank takes them back (one already sent is delivered).
    die_with_parent(signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))

    command = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    command.command()(main)
    exit_with_status(lambda: command(prog_name="python -m ecapa_accel.train"))
