"""Entry module for `accelerate launch -m ecapa_accel.train CONFIG --run-dir DIR [KEY=VALUE ...]`.

The loop itself lives in `trainer.py`, so that `ecapa_accel.train` (the function) and this module never clash.
"""

import sys

if __name__ == "__main__":
    from ecapa_accel.cli import main

    main(["train", *sys.argv[1:]])
