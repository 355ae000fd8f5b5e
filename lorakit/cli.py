"""Flags and config files onto `Config`, one to one.

`deepspeed examples/sft.py [CONFIG.yaml|json] --flag value ...`: every Config field is a flag of the same name;
a YAML or JSON file given as the only positional argument supplies values first and flags override it.
Booleans take `--bf16`, `--bf16 True` or `--bf16 false`; lists take commas (`--lora_target q_proj,v_proj`).
Errors are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.config import Config, flat_fields
from lorakit.distributed import launch_rank, leave_distributed
from lorakit.errors import LorakitError

TRUE, FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in TRUE + FALSE:
        raise ValueError(f"expected true or false, got {value!r}")
    return text in TRUE


def parse_whole(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


def parse_list(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


def parse_floats(value: Any) -> tuple[float, ...]:
    return tuple(float(item) for item in parse_list(value))


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None or str(value).lower() in ("none", "null", "") else parse(value)


PARSERS: dict[str, Callable[[Any], Any]] = {
    "bool": parse_bool,
    "int": parse_whole,
    "float": float,
    "str": str,
    "tuple[str, ...]": parse_list,
    "tuple[float, ...]": parse_floats,
    "int | None": _optional(parse_whole),
    "bool | None": lambda value: (
        None if value is None or str(value).lower() in ("none", "null", "auto") else parse_bool(value)
    ),
    "float | None": _optional(float),
    "str | None": lambda value: None if value is None or str(value).lower() in ("none", "null") else str(value),
}


def _wrong_shape(annotation: str, value: Any) -> str | None:
    """Why a config file's value cannot be this field's, before it is turned into text: YAML and JSON give lists,
    mappings, null and booleans where flags give strings, and str() of one is a folder named "['a', 'b']"."""
    if value is None and "None" not in annotation:
        return "expected a value, got null (leave the key out for the default)"
    if isinstance(value, dict):
        return f"expected {'a list' if annotation.startswith('tuple') else 'one value'}, got a mapping"
    if isinstance(value, (list, tuple)) and not annotation.startswith("tuple"):
        return f"expected one value, got a list {value}"
    if isinstance(value, bool) and annotation.split(" ")[0] in ("int", "float"):
        return f"expected a number, got {str(value).lower()} (YAML reads yes/no/on/off as booleans)"
    if isinstance(value, bool | int | float) and annotation in ("str", "str | None"):
        return f"expected text, got {value!r} (YAML reads 010 as 8, 1.10 as 1.1 and no as false: quote it)"
    return None


def coerce(name: str, value: Any) -> Any:
    """A flag's or a config file's value as the field's type; a one-line error if it is not one."""
    annotation = str(flat_fields()[name].type)
    wrong = _wrong_shape(annotation, value)
    if wrong:
        raise LorakitError(f"--{name}: {wrong}")
    try:
        return PARSERS[annotation](value)
    except (TypeError, ValueError) as err:
        raise LorakitError(f"--{name}: {err}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit prints usage; one line is clearer
        raise LorakitError(f"{message}; run with --help to list every flag")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        description="LoRA supervised fine-tuning on DeepSpeed ZeRO-3.",
    )
    parser.add_argument("config_file", nargs="?", help="YAML or JSON file of flag values (flags override it)")
    for name, field in flat_fields().items():
        boolean = str(field.type) in ("bool", "bool | None")
        parser.add_argument(
            f"--{name}",
            nargs="?" if boolean else None,
            const="true" if boolean else None,
            help=f"{field.metadata['help']} (default: {field.default})",
        )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise LorakitError(f"config file {path} not found")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse failure is the same user error
        raise LorakitError(f"config file {path} could not be parsed: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise LorakitError(f"config file {path} must map flag names to values")
    return values


def parse_config(argv: list[str], prog: str = "lorakit") -> Config:
    given = vars(build_parser(prog).parse_args(argv))
    given.pop("local_rank", None)
    config_file = given.pop("config_file", None)
    values = read_config_file(config_file) if config_file else {}
    unknown = sorted(set(values) - set(flat_fields()))
    if unknown:
        raise LorakitError(f"config file {config_file} has unknown key(s) {unknown}; keys are flag names")
    values.update(given)
    return Config.from_flat(values)  # which reads each value as its flag's (coerce)


def _close_progress_bars() -> None:
    """An open bar's line ends in a carriage return: closing it ends the line, so an error raised mid-training (a
    non-finite loss, a full disk, a signal) is a line of its own in a log file, not glued after the bar."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(action: Callable[[], Any]) -> int:
    """Run `action`, turning a LorakitError into one line on stderr (from rank 0) and exit status 2 (128 + N after
    signal N stopped training). A finished job leaves the process group on every rank before the process exits."""
    try:
        action()
    except LorakitError as err:
        if launch_rank() == 0:
            _close_progress_bars()
            print(f"lorakit: error: {err}", file=sys.stderr, flush=True)
        return getattr(err, "exit_code", 2)
    leave_distributed()
    return 0


def main(argv: list[str] | None = None, prog: str = "lorakit") -> int:
    """`deepspeed examples/sft.py FLAGS` and `python -m lorakit train FLAGS`."""
    from lorakit.train import train

    argv = sys.argv[1:] if argv is None else argv
    return run_cli(lambda: train(parse_config(argv, prog)))
