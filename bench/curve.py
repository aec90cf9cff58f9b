"""What CurveZMQ encryption costs per image on the worker link: NULL vs CURVE, side by side.

A DEALER (the worker) sends PNG-sized frames over TCP loopback to a ROUTER (the broker), which
acknowledges each with a tiny frame, as a result and the next request would. Reports milliseconds
per image for each payload size and mechanism, and the difference.

    python -m bench.curve [--images 200] [--json docs/benchmarks/curve-cost-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

# PNG sizes: SD-1.5 512x512 (~0.4 MB), SDXL 1024x1024 (~1.5 MB photo-like; up to ~3 MB for noise).
PAYLOAD_BYTES = (400_000, 1_500_000, 3_000_000)


def pair(ctx: zmq.Context, curve: bool) -> tuple[zmq.Socket, zmq.Socket, ThreadAuthenticator | None]:
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    auth = None
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        server.curve_secretkey, server.curve_publickey, server.curve_server = server_secret, server_public, True
        client.curve_secretkey, client.curve_publickey = client_secret, client_public
        client.curve_serverkey = server_public
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    return server, client, auth


def ms_per_image(curve: bool, payload_bytes: int, images: int) -> float:
    ctx = zmq.Context()
    server, client, auth = pair(ctx, curve)
    payload = os.urandom(payload_bytes)
    try:
        for _ in range(5):  # warm-up: handshake, buffers
            client.send_multipart([b"RESULT", payload])
            peer, *_ = server.recv_multipart()
            server.send_multipart([peer, b"ok"])
            client.recv()
        started = time.perf_counter()
        for _ in range(images):
            client.send_multipart([b"RESULT", payload], copy=False)
            peer, *_ = server.recv_multipart(copy=False)
            server.send_multipart([peer.bytes, b"ok"])
            client.recv()
        return (time.perf_counter() - started) / images * 1000.0
    finally:
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    rows = []
    for size in PAYLOAD_BYTES:
        null_ms = ms_per_image(False, size, args.images)
        curve_ms = ms_per_image(True, size, args.images)
        rows.append({"payload_bytes": size, "null_ms_per_image": round(null_ms, 3),
                     "curve_ms_per_image": round(curve_ms, 3), "curve_extra_ms": round(curve_ms - null_ms, 3),
                     "curve_ratio": round(curve_ms / null_ms, 2)})
        print(f"{size / 1e6:.1f} MB: NULL {null_ms:.2f} ms, CURVE {curve_ms:.2f} ms per image "
              f"(+{curve_ms - null_ms:.2f} ms, x{curve_ms / null_ms:.1f})")
    if args.json:
        document = {"command": "python -m bench.curve --images %d --json %s" % (args.images, args.json),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (this repo's CI kind)",
                    "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "rows": rows}
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)


if __name__ == "__main__":
    main()
