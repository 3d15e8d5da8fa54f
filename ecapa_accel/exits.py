"""Exit statuses of the `ecapa-accel` CLI and the `-m ecapa_accel.train` entry (the only places that exit).

UserError -> 2 with one `error: ...` line; Preempted -> 143 (SIGTERM) / 130 (SIGINT) with one line, so a
scheduler script can requeue on 143.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from .errors import Preempted, UserError


def exit_with_status(command: Callable[[], object]) -> None:
    try:
        command()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal now must not cut the exit short
            signal.signal(signum, signal.SIG_IGN)
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one line for the job
            print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
