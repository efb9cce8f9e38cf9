#!/usr/bin/env python3
"""Writes a bench copy of config/moat.toml: the shipped listeners replaced by one plain loopback listener,
and the given keys set. Every key must exist in the source, so a renamed key fails the bench loudly.

    bench-config.py SRC DST PORT [--listener-extra 'auth_without_tls = true'] section.key=VALUE ...

VALUE is TOML as it should appear in the file ('"text"', 'false', '5000').
"""
import re
import sys


def main(argv):
    src, dst, port, *rest = argv
    extra = ""
    settings = {}
    while rest:
        arg = rest.pop(0)
        if arg == "--listener-extra":
            extra += rest.pop(0) + "\n"
            continue
        key, _, value = arg.partition("=")
        section, _, name = key.partition(".")
        settings[(section, name)] = value
    out, section, skip, seen = [], None, False, set()
    for line in open(src):
        m = re.match(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?", line)
        if m:
            section = m.group(2)
            skip = section == "listener"
            if skip:
                continue
        if skip:
            continue
        k = re.match(r"^\s*([A-Za-z0-9_]+)\s*=", line)
        if k and (section, k.group(1)) in settings:
            line = f"{k.group(1)} = {settings[(section, k.group(1))]}\n"
            seen.add((section, k.group(1)))
        out.append(line)
    missing = set(settings) - seen
    if missing:
        sys.exit(f"{src} lacks keys {sorted(missing)}; update the bench script")
    out.append(f'\n[[listener]]\nname = "bench"\naddress = "127.0.0.1:{port}"\nmode = "plain"\nrole = "mx"\n'
               f"require_tls = false\n{extra}")
    with open(dst, "w") as f:
        f.write("".join(out))
    try:
        import tomllib
        with open(dst, "rb") as f:
            c = tomllib.load(f)
        assert len(c["listener"]) == 1
    except ImportError:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
