"""`python -m lorakit train FLAGS` and `python -m lorakit preview [--num_examples N] FLAGS`."""

from __future__ import annotations

import json
import sys

from lorakit.cli import main, parse_config, run_cli

USAGE = (
    "usage: python -m lorakit {train,preview} [CONFIG_FILE] [--flag value ...]  (--help after a command lists flags)"
)


def _preview(argv: list[str]) -> None:
    from lorakit.errors import LorakitError
    from lorakit.preview import preview

    count = 3
    if "--num_examples" in argv:
        at = argv.index("--num_examples")
        if at + 1 >= len(argv) or not argv[at + 1].isdigit():
            raise LorakitError("--num_examples needs a whole number")
        count = int(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    for record in preview(parse_config(argv, "lorakit preview"), count):
        print(json.dumps(record, ensure_ascii=False))


def entry(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "preview"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "train":
        return main(argv[1:], "lorakit train")
    return run_cli(lambda: _preview(argv[1:]))


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
