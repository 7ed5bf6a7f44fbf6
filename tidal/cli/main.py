"""`tidal` command line: `tidal train job.yaml [a.b.c=value ...]`, `tidal check job.yaml ...`."""

from __future__ import annotations

import argparse
import json
import sys

from tidal.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="RL post-training for LLMs on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "run a training job"), ("check", "validate a job (config, paths, tokenizer, machine) and print it")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="job YAML file, e.g. examples/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.total_steps=5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check":
            from tidal.controller.preflight import preflight

            print(json.dumps(cfg.model_dump(mode="json"), indent=1))
            print(json.dumps(cfg.sizes.model_dump(), indent=1))
            preflight(cfg)
            print("tidal: the job can start", file=sys.stderr)
            return 0
        from tidal.controller.run import train

        result = train(cfg)  # runs the same pre-flight checks before anything starts
    except ConfigError as err:  # raised only before any process starts
        print(f"tidal: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
