#!/usr/bin/env python3
"""A pipelining SMTP load client for scripts/bench-e2e.sh (shape p): smtp-source never pipelines, real MTAs do
(Postfix's smtp client sends MAIL, RCPT and DATA in one write when the server offers PIPELINING).

    bench-pipelining-client.py HOST PORT SESSIONS MESSAGES SIZE RCPTS

SESSIONS connections (one thread each) share MESSAGES messages of SIZE body bytes, each with RCPTS
recipients; per message: MAIL + RCPTs + DATA in one write, the replies, then the message and its final dot
in one write. Connections are reused (like smtp-source -d). Exits non-zero if any reply is not positive.
"""
import socket
import sys
import threading


def replies(sock, buf, n):
    """Reads n replies (multi-line aware); returns (codes, rest of buffer)."""
    codes = []
    while len(codes) < n:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("server closed the connection")
            buf += chunk
        line, buf = buf.split(b"\r\n", 1)
        if line[3:4] != b"-":
            codes.append(int(line[:3]))
    return codes, buf


def session(host, port, count, size, rcpts, failures):
    try:
        run_session(host, port, count, size, rcpts, failures)
    except (OSError, RuntimeError, ValueError) as e:
        failures.append(str(e))


def run_session(host, port, count, size, rcpts, failures):
    sock = socket.create_connection((host, port), timeout=60)
    buf = b""
    codes, buf = replies(sock, buf, 1)
    sock.sendall(b"EHLO bench.example\r\n")
    codes, buf = replies(sock, buf, 1)
    envelope = b"MAIL FROM:<sender@bench.example>\r\n"
    envelope += b"".join(b"RCPT TO:<rcpt%d@sink.example>\r\n" % i for i in range(rcpts))
    envelope += b"DATA\r\n"
    line = b"x" * 78 + b"\r\n"
    body = b"From: sender@bench.example\r\nTo: rcpt@sink.example\r\nSubject: bench\r\n\r\n"
    body += line * (size // len(line)) + b".\r\n"
    for _ in range(count):
        sock.sendall(envelope)
        codes, buf = replies(sock, buf, rcpts + 2)
        if codes[-1] != 354 or any(c >= 400 for c in codes[:-1]):
            failures.append(codes)
            sock.sendall(b"RSET\r\n")
            _, buf = replies(sock, buf, 1)
            continue
        sock.sendall(body)
        codes, buf = replies(sock, buf, 1)
        if codes[0] != 250:
            failures.append(codes)
    sock.sendall(b"QUIT\r\n")
    sock.close()


def main(argv):
    host, port, sessions, messages, size, rcpts = argv[1], int(argv[2]), *map(int, argv[3:7])
    failures = []
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    threads = [threading.Thread(target=session, args=(host, port, n, size, rcpts, failures)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit(f"{len(failures)} messages failed, first replies: {failures[0]}")


if __name__ == "__main__":
    main(sys.argv)
