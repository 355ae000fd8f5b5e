"""Entry point: `deepspeed examples/sft.py FLAGS` (or torchrun) runs lorakit with the reference run's flags."""

import sys

from lorakit.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="examples/sft.py"))
