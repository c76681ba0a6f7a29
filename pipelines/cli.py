"""The shared shape of the pipelines' command lines: --input, --output, --quiet and key=value config overrides.

Exit codes: 0 done, 1 the run could not produce anything (RuntimeError), 2 a bad config or input (ConfigError).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lawm.config import ConfigError, from_dict, parse_overrides


def run_cli(argv: list[str] | None, *, prog: str, doc: str, config_cls: type, section: str, input_help: str,
            run: Callable[[Any, str, str, bool], dict], show: tuple[str, ...], wrote: Callable[[dict, str], str]) -> int:
    """Parse the arguments, build `config_cls` strictly (errors name `section.key`), call
    `run(cfg, input, output, progress)` and print the summary keys in `show`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--output", required=True, help="the output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help=f"{config_cls.__name__} fields as key=value")
    args = parser.parse_args(argv)
    try:
        cfg = from_dict(config_cls, parse_overrides(args.overrides), prefix=section)
        summary = run(cfg, args.input, args.output, not args.quiet)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in show}, default=str))
    print(f"{section}: wrote {wrote(summary, args.output)}")
    return 0
