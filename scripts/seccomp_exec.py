#!/usr/bin/python3
"""Runs a command under the system call filter of a systemd unit's SystemCallFilter= lines,
as systemd would load it, so that the filter the shipped unit declares is tested on the
real daemon even where PID 1 is not systemd.

    scripts/seccomp_exec.py systemd/streamiq.service -- target/release/streamiq run --config FILE

The unit's lines are read in order: an allow-list line (`SystemCallFilter=@system-service`)
allows its calls, a `~` line (`SystemCallFilter=~@privileged`) removes its calls again;
every other call fails with the errno of SystemCallErrorNumber= (EPERM when unset is
systemd's "kill"; here EPERM, so that a denied call shows up as an error, not a crash).
Groups are resolved with `systemd-analyze syscall-filter`, so they are the installed
systemd's own definitions. Needs Debian's python3-seccomp (run with /usr/bin/python3).
"""
import errno
import os
import subprocess
import sys

import seccomp


def group(name, seen=None):
    """The system calls of `@name` (nested groups resolved)."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name],
                         check=True, capture_output=True, text=True).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= group(item, seen) if item.startswith("@") else {item}
    return calls


def names(items):
    calls = set()
    for item in items:
        calls |= group(item) if item.startswith("@") else {item}
    return calls


def unit_filter(unit):
    """(allowed calls, errno) from the unit's SystemCallFilter= and SystemCallErrorNumber=."""
    allowed, err = set(), errno.EPERM
    with open(unit, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if line.startswith("SystemCallFilter="):
                value = line.split("=", 1)[1].strip()
                if value.startswith("~"):
                    allowed -= names(value[1:].split())
                else:
                    allowed |= names(value.split())
            elif line.startswith("SystemCallErrorNumber="):
                err = getattr(errno, line.split("=", 1)[1].strip())
    if not allowed:
        sys.exit(f"{unit}: no SystemCallFilter= allow-list")
    return allowed, err


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    allowed, err = unit_filter(sys.argv[1])
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(err))
    known = 0
    for call in sorted(allowed):
        try:
            f.add_rule(seccomp.ALLOW, call)
            known += 1
        except (RuntimeError, ValueError):
            pass  # a name this kernel or architecture does not have
    print(f"seccomp_exec: {known} system calls allowed, others fail with "
          f"{errno.errorcode[err]}", file=sys.stderr)
    f.load()
    os.execvp(sys.argv[3], sys.argv[3:])


if __name__ == "__main__":
    main()
