"""``node-runtime coordinate [--stop]``: the multi-instance coordination command (start + verify the service)."""

from __future__ import annotations

import argparse
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stop", action="store_true",
                        help="Stop this node's coordination service instead of starting it.")
    parser.add_argument("--sshd", dest="sshd_path", metavar="PATH",
                        help="The sshd binary to run (default: sshd on PATH, else /usr/sbin/sshd).")


def run(args: argparse.Namespace) -> None:
    """Start this node's coordination service (sshd on the task port, task keys), verify it with a real ssh
    handshake, record the node's fabric detection, and exit 0. Idempotent: a live service is kept, a stale one
    replaced."""
    from node_runtime.coordinate import current_environment, start_service, stop_service
    from node_runtime.fabric import SHM_MOUNT

    started = time.monotonic()
    env = current_environment()
    if args.stop:
        stopped = stop_service(env)
        print(f"coordinate: service on {env.current_address}:{env.ssh_port} "
              + ("stopped" if stopped else "was not running"))
        return
    status, pid, node = start_service(env, args.sshd_path)
    print(f"coordinate: sshd on {env.current_address}:{env.ssh_port} {status} (pid {pid}), verified in "
          f"{(time.monotonic() - started) * 1000:.0f} ms; InfiniBand: {','.join(node.infiniband) or 'none'}, MPI: "
          f"{node.mpi or 'none'}{' with UCX' if node.ucx else ''}, {node.physical_cores} physical core(s), "
          f"{SHM_MOUNT} {node.shm_bytes // 2**20} MiB")
