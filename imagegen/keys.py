"""CurveZMQ keys for the worker link: who may join as a worker, and under which names.

Create keys (one pair for the broker, one per worker host)::

    python -m imagegen.keys broker keys/                 # keys/broker.key, keys/broker.key_secret
    python -m imagegen.keys worker gpu-host-1 keys/      # keys/gpu-host-1.key, keys/gpu-host-1.key_secret

Copy each worker's *public* ``NAME.key`` into the broker's authorized-keys folder
(``BROKER_AUTHORIZED_KEYS_DIR``), ``broker.key`` (public) to every worker host, and each
``.key_secret`` only to the machine it belongs to.

The broker accepts a connection only from a key in that folder (the ZAP handler refuses others
before a single message is read, so an unknown worker can neither register nor receive a prompt).
A key may register only worker names equal to its file's name or starting with it and a dash:
``gpu-host-1.key`` admits ``gpu-host-1`` and ``gpu-host-1-gpu0`` ... ``gpu-host-1-gpu7``, but not
``gpu-host-2-gpu0``, so a registered key cannot pose as another host's worker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import zmq.auth


def authorized_keys(directory: str | Path) -> dict[bytes, str]:
    """Public key (z85) -> the name stem it may register under, from every ``*.key`` in ``directory``."""
    keys = {}
    for path in sorted(Path(directory).glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        keys[public] = path.stem
    return keys


def name_allowed(worker_name: str, stem: str) -> bool:
    return worker_name == stem or worker_name.startswith(stem + "-")


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; raises ValueError naming the file if it has no secret."""
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (pass the .key_secret file, not the .key)")
    return public, secret


def load_public(path: str | Path) -> bytes:
    public, _ = zmq.auth.load_certificate(path)
    return public


class KeyAllowList:
    """ZAP credentials provider: admits exactly the public keys of the authorized-keys folder."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.keys = authorized_keys(self.directory)
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            self.refused += 1
        return allowed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagegen.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    broker = sub.add_parser("broker", help="create the broker's key pair")
    broker.add_argument("directory")
    worker = sub.add_parser("worker", help="create a worker host's key pair")
    worker.add_argument("name", help="the worker name (or host name) this key may register as")
    worker.add_argument("directory")
    args = parser.parse_args(argv)
    name = "broker" if args.role == "broker" else args.name
    directory = Path(args.directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    Path(secret_file).chmod(0o600)
    print(f"public key: {public_file}\nsecret key: {secret_file} (keep it on its own machine only)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
