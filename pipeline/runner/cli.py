"""Command-line flags generated from the config dataclasses (`pipeline/configs.py`).

Flags use the reference's `--name=value` style; booleans accept `--flag`, `--flag=False` and
`--noflag`. Only flags the user actually gives override presets and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from pipeline import configs


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "t", "yes", "y"):
        return True
    if lowered in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _field_type(cls: type, f: dataclasses.Field) -> type:
    if f.metadata.get("kind"):
        return f.metadata["kind"]
    default = getattr(cls(), f.name)
    if isinstance(default, bool):
        return bool
    return type(default)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"error: {message}\n")


def build_parser(prog: str, description: str, extra: list[tuple[str, dict]] | None = None):
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    defaults = configs.SimCLRConfig()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, path, f, cls in configs.flag_fields():
        section = path.split(".")[0].replace("<stage>", "train stage (set by --train_mode)")
        group = groups.setdefault(section, parser.add_argument_group(section))
        kind = _field_type(cls, f)
        default = configs.get_path(defaults, configs.default_path(path))
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": flag, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            group.add_argument(f"--{flag}", nargs="?", const=True, type=_parse_bool, **kwargs)
            group.add_argument(
                f"--no{flag}", dest=flag, action="store_false", help=argparse.SUPPRESS
            )
        else:
            group.add_argument(f"--{flag}", type=kind, **kwargs)
    for name, kwargs in extra or []:
        parser.add_argument(name, **kwargs)
    parser.epilog = "Dataset presets (applied when the flag is not given): " + "; ".join(
        f"{name}: " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in preset.items())
        for name, preset in configs.DATASET_PRESETS.items()
        if preset
    )
    return parser


def parse_config(
    argv: list[str] | None, prog: str, description: str, extra: list[tuple[str, dict]] | None = None
) -> tuple[configs.SimCLRConfig, dict[str, Any]]:
    """Parses flags into a validated config; extra runner-only flags come back as a dict."""
    parser = build_parser(prog, description, extra)
    namespace = vars(parser.parse_args(argv))
    extra_names = {kw.get("dest", name.lstrip("-")) for name, kw in extra or []}
    extras = {k: namespace.pop(k) for k in list(namespace) if k in extra_names}
    try:
        config = configs.build_config(namespace)
    except configs.ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    return config, extras


if __name__ == "__main__":  # pragma: no cover - convenience
    print(configs.flag_table() if sys.argv[1:] == ["--table"] else "use local_runner.py")
