"""``node-runtime env``: show what this node learns from its environment (or every problem with it)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="as_json", action="store_true", help="Print the model as JSON.")


def run(args: argparse.Namespace) -> None:
    """Print this node's environment model; exit 2 listing every problem if it is invalid."""
    from node_runtime.env import NodeEnvironment

    data = NodeEnvironment.current().to_dict()
    if args.as_json:
        import json

        print(json.dumps(data, indent=2))
        return
    width = max(map(len, data))
    for name, value in data.items():
        shown = "-" if value in (None, "", []) else ",".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name:<{width}}  {shown}")
