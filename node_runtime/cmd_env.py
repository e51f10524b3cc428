"""``node-runtime env``: show what this node learns from its environment (or every problem with it)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="as_json", action="store_true", help="Print the model as JSON.")


def run(args: argparse.Namespace) -> None:
    """Print this node's environment model and what it offers MPI (fabric detection, as coordinate records it); exit
    2 listing every problem if the environment is invalid."""
    from node_runtime.env import NodeEnvironment
    from node_runtime.fabric import detect
    from node_runtime.sshd import clean_environ

    env = NodeEnvironment.current()
    data = env.to_dict()
    node = detect(env.current_address, clean_environ(), env.node_shared_dir)
    if args.as_json:
        import json

        print(json.dumps({**data, "fabric": node.to_dict()}, indent=2))
        return
    data.update({"infiniband": list(node.infiniband), "mpi": node.mpi, "mpi_ucx": node.ucx,
                 "physical_cores": node.physical_cores, "shm_bytes": node.shm_bytes, "interface": node.interface})
    width = max(map(len, data))
    for name, value in data.items():
        shown = "-" if value in (None, "", []) else ",".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name:<{width}}  {shown}")
