#!/usr/bin/env python3
"""TLS 1.3 session resumption against moat's implicit-TLS listener: the server CPU per full handshake and per
resumed one (session tickets), measured on the server process, and how many resumptions the server granted.

    bench-tls-resume.py PORT SERVER_PID [N]

`openssl s_time -reuse` cannot measure this: it never reads, so it never sees the tickets a TLS 1.3 server
sends after the handshake. This client reads moat's greeting on every connection (which takes in the
tickets), keeps the newest session and offers it on the next connection. Loopback only; N connections per
kind (default 500, at most 5000). Prints: full_us resumed_us resumed/N.
"""
import os
import socket
import ssl
import sys


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv):
    port, pid = int(argv[0]), int(argv[1])
    n = min(int(argv[2]) if len(argv) > 2 else 500, 5000)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def connect(session=None):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname="bench.test", session=session)
        greeting = s.recv(512)
        if not greeting.startswith(b"220"):
            sys.exit(f"bench-tls-resume: no greeting: {greeting!r}")
        out = (s.session, s.session_reused)
        s.close()
        return out

    for _ in range(20):
        connect()
    c0 = cpu_seconds(pid)
    for _ in range(n):
        connect()
    full = cpu_seconds(pid) - c0
    session, _ = connect()
    reused = 0
    c0 = cpu_seconds(pid)
    for _ in range(n):
        newer, was_reused = connect(session)
        reused += was_reused
        session = newer or session
    resumed = cpu_seconds(pid) - c0
    print(f"{full * 1e6 / n:.0f} {resumed * 1e6 / n:.0f} {reused}/{n}")


if __name__ == "__main__":
    main(sys.argv[1:])
