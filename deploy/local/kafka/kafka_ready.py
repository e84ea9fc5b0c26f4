#!/usr/bin/env python3
"""Readiness probe for a Kafka broker, using only the Python standard library.

Sends an ApiVersions request and then a Metadata request over the Kafka wire
protocol and succeeds (exit 0) only when the broker answers with at least one
live broker in its metadata. A KRaft broker lists itself there only once it
has caught up with the controller and been unfenced, so this is a real
"ready to serve clients" check, not just an open port.

Usage: kafka_ready.py [--bootstrap 127.0.0.1:29092] [--timeout 5] [--topics]
Exit codes: 0 ready, 1 not ready (reason on stderr).
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys

API_METADATA = 3
API_VERSIONS = 18
# Metadata v4..v8 share the non-flexible encoding handled below; Kafka 4.x
# supports v4 and later (v0-v3 were removed by KIP-896).
METADATA_VERSIONS = range(4, 9)
CLIENT_ID = b"terranoha-ready"


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError("truncated response")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def int8(self) -> int:
        return self.take(">b")

    def int16(self) -> int:
        return self.take(">h")

    def int32(self) -> int:
        return self.take(">i")

    def string(self) -> str | None:
        length = self.int16()
        if length < 0:
            return None
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8")

    def int32_array(self) -> list[int]:
        return [self.int32() for _ in range(max(self.int32(), 0))]


def recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("connection closed by broker")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def call(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> Reader:
    header = struct.pack(">hhih", api_key, version, corr, len(CLIENT_ID)) + CLIENT_ID
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", recv_exact(sock, 4))
    reader = Reader(recv_exact(sock, size))
    if reader.int32() != corr:
        raise ValueError("correlation id mismatch")
    return reader


def probe(host: str, port: int, timeout: float) -> dict:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)

        # ApiVersions v0: empty body; the answer lists supported versions.
        r = call(sock, API_VERSIONS, 0, 1, b"")
        error = r.int16()
        if error != 0:
            raise RuntimeError(f"ApiVersions error code {error}")
        ranges = {}
        for _ in range(r.int32()):
            key, lo, hi = r.int16(), r.int16(), r.int16()
            ranges[key] = (lo, hi)
        if API_METADATA not in ranges:
            raise RuntimeError("broker does not offer the Metadata API")
        lo, hi = ranges[API_METADATA]
        usable = [v for v in METADATA_VERSIONS if lo <= v <= hi]
        if not usable:
            raise RuntimeError(f"no usable Metadata version (broker offers v{lo}-v{hi})")
        version = max(usable)

        body = struct.pack(">i", -1)  # topics: null = all topics
        body += struct.pack(">b", 0)  # allow_auto_topic_creation
        if version >= 8:
            body += struct.pack(">bb", 0, 0)  # include_*_authorized_operations
        r = call(sock, API_METADATA, version, 2, body)
        r.int32()  # throttle_time_ms
        brokers = []
        for _ in range(r.int32()):
            node_id, host_, port_ = r.int32(), r.string(), r.int32()
            r.string()  # rack
            brokers.append(f"{node_id}@{host_}:{port_}")
        cluster_id = r.string()
        r.int32()  # controller_id
        topics = []
        for _ in range(r.int32()):
            r.int16()  # error_code
            name = r.string()
            internal = r.int8()
            partitions = r.int32()
            for _ in range(max(partitions, 0)):
                r.int16(), r.int32(), r.int32()  # error, index, leader
                if version >= 7:
                    r.int32()  # leader_epoch
                r.int32_array(), r.int32_array()  # replicas, isr
                if version >= 5:
                    r.int32_array()  # offline replicas
            if version >= 8:
                r.int32()  # topic_authorized_operations
            if not internal:
                topics.append((name, partitions))
        return {"brokers": brokers, "cluster_id": cluster_id, "topics": sorted(topics)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:29092")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--topics", action="store_true", help="also list user topics")
    args = parser.parse_args()
    host, _, port = args.bootstrap.rpartition(":")
    try:
        info = probe(host, int(port), args.timeout)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"kafka not ready at {args.bootstrap}: {exc}", file=sys.stderr)
        return 1
    if not info["brokers"]:
        print(f"kafka not ready at {args.bootstrap}: no live brokers yet", file=sys.stderr)
        return 1
    print(
        f"kafka ready at {args.bootstrap}: brokers={','.join(info['brokers'])}"
        f" cluster_id={info['cluster_id']} topics={len(info['topics'])}"
    )
    if args.topics:
        for name, partitions in info["topics"]:
            print(f"  {name} ({partitions} partitions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
