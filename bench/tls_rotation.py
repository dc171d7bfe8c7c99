"""TLS rotation: how long after a certificate is replaced on disk a new connection is shown it.

    python -m bench.tls_rotation [--rotations 10]

Starts `twistd stigg-sidecar` (OFFLINE) with TLS_CERT_FILE and TLS_KEY_FILE in a directory laid
out as the kubelet lays out a mounted Secret (each file a symlink through `..data`), then, per
rotation, writes a new certificate and key from the same test CA (trustme) into a new directory
and swaps `..data` over to it with one rename, as a cert-manager renewal reaches a pod. From that
rename it opens a new TLS connection (ALPN h2, a full handshake each) every 5 ms until the
certificate shown is the new one, and reports that time: min, median, max. A gRPC call on a
connection opened before the rotations must still be answered after all of them.

The sidecar looks at the files once a second (`process/watch.py`), so the expected figure is
spread evenly between 0 and about 1 s.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import sys
import time
from pathlib import Path

import grpc
import trustme  # a test dependency (requirements-dev.lock): run from the dev environment

from bench.harness import BenchError, Children, run_with_children, start_sidecar
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

PROBE_INTERVAL = 0.005
ROTATION_BOUND = 10.0  # seconds a rotation may take before the run fails


class SecretVolume:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir()
        self.version = 0

    def write(self, files: dict[str, bytes]) -> float:
        """Write `files` into a new version and swap `..data` to it; the time of the swap (monotonic)."""
        self.version += 1
        target = self.directory / f"..v{self.version}"
        target.mkdir()
        for name, content in files.items():
            (target / name).write_bytes(content)
        link = self.directory / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.directory / "..data")
        swapped = time.monotonic()
        for name in files:
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(Path("..data") / name)
        return swapped


def pair(ca: trustme.CA) -> tuple[dict[str, bytes], bytes]:
    """The Secret's files for a new leaf, and the leaf's DER (what a handshake shows)."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pem = leaf.cert_chain_pems[0].bytes().decode()
    files = {"tls.crt": b"".join(b.bytes() for b in leaf.cert_chain_pems), "tls.key": leaf.private_key_pem.bytes()}
    return files, ssl.PEM_cert_to_DER_cert(pem)


def shown_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise BenchError("the sidecar showed no certificate")
    return der


def bench(children: Children, args: argparse.Namespace) -> int:
    ca = trustme.CA()
    volume = SecretVolume(children.path("tls"))
    files, first = pair(ca)
    volume.write(files)
    sidecar = start_sidecar(children, None, None, {
        "TLS_CERT_FILE": str(volume.directory / "tls.crt"), "TLS_KEY_FILE": str(volume.directory / "tls.key"),
    })
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    context.set_alpn_protocols(["h2"])
    if shown_certificate(sidecar.grpc_port, context) != first:
        raise BenchError("the first certificate is not the one served")
    channel = grpc.secure_channel(sidecar.target, grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes()))
    stub = SidecarServiceStub(channel)
    request = pb.GetBooleanEntitlementRequest(customer_id="c", feature_id="f")
    stub.GetBooleanEntitlement(request, timeout=5)  # the connection that must outlive the rotations

    took = []
    for _ in range(args.rotations):
        files, der = pair(ca)
        time.sleep(0.2 + (len(took) % 5) * 0.17)  # land the swaps at different points of the poll cycle
        swapped = volume.write(files)
        probes = 0
        while shown_certificate(sidecar.grpc_port, context) != der:
            probes += 1
            if time.monotonic() - swapped > ROTATION_BOUND:
                raise BenchError(f"a rotated certificate was not served within {ROTATION_BOUND}s")
            time.sleep(PROBE_INTERVAL)
        took.append(time.monotonic() - swapped)
        print(f"rotation {len(took)}: new certificate shown {took[-1] * 1000:.0f} ms after the swap ({probes} earlier handshakes)",
              flush=True)
    stub.GetBooleanEntitlement(request, timeout=5)
    channel.close()
    print(
        f"{len(took)} rotations: from the swap of ..data to a new connection shown the new certificate "
        f"min {min(took) * 1000:.0f} ms, median {statistics.median(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms; "
        "the connection opened before them still answered"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotations", type=int, default=10, help="certificate swaps (default 10)")
    return run_with_children(bench, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
