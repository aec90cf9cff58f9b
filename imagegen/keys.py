"""CurveZMQ keys for the worker link: who may join as a worker, and under which names.

Create every key of a cluster in one go (the broker's pair, one pair per worker host, and the
broker's folder of authorized keys), one folder to copy to each machine::

    python -m imagegen.keys cluster keys/ gpu-host-1 gpu-host-2
    # keys/broker/     -> the broker host: broker.key_secret, authorized/gpu-host-1.key, ...
    # keys/gpu-host-1/ -> gpu-host-1: gpu-host-1.key_secret, broker.key

Or one pair at a time::

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

The folder is read again whenever its ``*.key`` files change (checked at every handshake and every
heartbeat interval): a host's key copied in admits it, a key removed disconnects that host's
workers, with no broker restart.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import zmq.auth

log = logging.getLogger(__name__)


def authorized_keys(directory: str | Path) -> dict[bytes, str]:
    """Public key (z85) -> the name stem it may register under, from every ``*.key`` in ``directory``."""
    keys = {}
    for path in sorted(Path(directory).glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        keys[public] = path.stem
    return keys


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
    """ZAP credentials provider: admits exactly the public keys the authorized-keys folder holds now.

    ``refresh()`` reads the folder again when the names, sizes or modification times of its ``*.key``
    files changed; the ZAP callback calls it before each verdict, so a key copied in is admitted at
    its first handshake. The first read raises (a start-up error); a later one that fails (a key
    file half-copied, the folder unreadable) keeps the keys it had, logs why, and is tried again at
    the next refresh."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.refused = 0
        self._signature = self._current_signature()
        self.keys = authorized_keys(self.directory)

    def _current_signature(self) -> tuple:
        return tuple((path.name, stat.st_size, stat.st_mtime_ns)
                     for path in sorted(self.directory.glob("*.key")) for stat in [path.stat()])

    def refresh(self) -> bool:
        """Read the folder again if its files changed; True if the keys changed."""
        try:
            signature = self._current_signature()
            if signature == self._signature:
                return False
            keys = authorized_keys(self.directory)
        except (OSError, ValueError) as exc:
            log.warning("could not read the authorized keys in %s (keeping the %d read before): %s",
                        self.directory, len(self.keys), exc)
            return False
        added = sorted(stem for key, stem in keys.items() if self.keys.get(key) != stem)
        removed = sorted(stem for key, stem in self.keys.items() if keys.get(key) != stem)
        self.keys, self._signature = keys, signature
        if added or removed:
            log.info("authorized keys in %s: %d now; added %s, removed %s", self.directory, len(keys),
                     ", ".join(added) or "none", ", ".join(removed) or "none")
        return bool(added or removed)

    def callback(self, domain: str, key: bytes) -> bool:
        self.refresh()
        allowed = key in self.keys
        if not allowed:
            self.refused += 1
        return allowed


def make_cluster_keys(directory: str | Path, hosts: list[str]) -> dict[str, dict[str, str]]:
    """The broker's pair and one pair per worker host under ``directory``, laid out per machine
    (see the module docstring); returns each machine's settings (environment variable -> path).
    Refuses to overwrite a folder that already holds keys (the machines holding them would be locked out)."""
    root = Path(directory)
    broker_dir, authorized = root / "broker", root / "broker" / "authorized"
    for folder in [broker_dir] + [root / host for host in hosts]:
        if folder.exists() and any(folder.glob("*.key*")):
            raise FileExistsError(f"{folder} already holds keys; choose another folder or remove it first")
    if "broker" in hosts or len(set(hosts)) != len(hosts):
        raise ValueError("worker host names must be unique and not 'broker'")
    authorized.mkdir(parents=True, exist_ok=True)
    broker_public, broker_secret = zmq.auth.create_certificates(broker_dir, "broker")
    Path(broker_secret).chmod(0o600)
    settings = {"broker": {"BROKER_CURVE_SECRET_KEY": str(broker_secret),
                           "BROKER_AUTHORIZED_KEYS_DIR": str(authorized)}}
    for host in hosts:
        host_dir = root / host
        host_dir.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(host_dir, host)
        Path(secret).chmod(0o600)
        shutil.copyfile(public, authorized / f"{host}.key")
        shutil.copyfile(broker_public, host_dir / "broker.key")
        settings[host] = {"WORKER_CURVE_SECRET_KEY": str(secret),
                          "BROKER_CURVE_PUBLIC_KEY": str(host_dir / "broker.key")}
    return settings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagegen.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    broker = sub.add_parser("broker", help="create the broker's key pair")
    broker.add_argument("directory")
    worker = sub.add_parser("worker", help="create a worker host's key pair")
    worker.add_argument("name", help="the worker name (or host name) this key may register as")
    worker.add_argument("directory")
    cluster = sub.add_parser("cluster", help="create the broker's pair, one pair per worker host and the "
                                             "broker's authorized-keys folder, one folder per machine")
    cluster.add_argument("directory")
    cluster.add_argument("hosts", nargs="+", metavar="worker_host",
                         help="a worker host's name; its workers are named HOST or HOST-... (e.g. HOST-gpu0)")
    args = parser.parse_args(argv)
    if args.role == "cluster":
        try:
            machines = make_cluster_keys(args.directory, args.hosts)
        except (FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for machine, env in machines.items():
            where = "the broker host" if machine == "broker" else f"worker host {machine}"
            print(f"copy {Path(args.directory) / machine}/ to {where} and set:")
            print("    " + " ".join(f"{name}={path}" for name, path in env.items()))
        print("each .key_secret must stay on its own machine only")
        return 0
    name = "broker" if args.role == "broker" else args.name
    directory = Path(args.directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    Path(secret_file).chmod(0o600)
    print(f"public key: {public_file}\nsecret key: {secret_file} (keep it on its own machine only)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
