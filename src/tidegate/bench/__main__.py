"""``python -m tidegate.bench``: the same as ``tidegate bench``."""

from __future__ import annotations

import argparse
import sys

from tidegate.bench import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidegate bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
