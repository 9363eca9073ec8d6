"""Writes docs/flags.md from the config dataclasses: `python docs/make_flags_doc.py`."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.configs import flag_table  # noqa: E402


def render() -> str:
    header = (ROOT / "docs" / "flags_header.md").read_text()
    return header + "\n" + flag_table() + "\n"


if __name__ == "__main__":
    (ROOT / "docs" / "flags.md").write_text(render())
