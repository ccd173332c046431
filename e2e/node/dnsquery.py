#!/usr/bin/env python3
"""Resolves NAME to its IPv4 addresses by asking SERVER directly (one UDP query, no
search list), so a test can check the cluster DNS from the host.

  dnsquery.py SERVER NAME     prints one address per line; exit 1 when there is none
"""
import random
import socket
import struct
import sys


def query(server, name, timeout=2.0):
    ident = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, 53))
        reply, _ = s.recvfrom(4096)
    got, flags, _, answers, _, _ = struct.unpack(">HHHHHH", reply[:12])
    if got != ident or flags & 0xF:
        return []
    offset = 12 + len(question) + 4
    addresses = []
    for _ in range(answers):
        while reply[offset] and reply[offset] & 0xC0 != 0xC0:  # a name: labels or a pointer
            offset += reply[offset] + 1
        offset += 2 if reply[offset] & 0xC0 == 0xC0 else 1
        kind, _, _, length = struct.unpack(">HHIH", reply[offset:offset + 10])
        offset += 10
        if kind == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[offset:offset + 4]))
        offset += length
    return addresses


if __name__ == "__main__":
    found = query(sys.argv[1], sys.argv[2])
    print("\n".join(found))
    sys.exit(0 if found else 1)
