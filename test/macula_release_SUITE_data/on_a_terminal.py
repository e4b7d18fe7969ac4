#!/usr/bin/env python3
"""Runs a command on a pseudo-terminal the way a person at a shell would: waits for
the shell's prompt, types one line, waits for the answer, then leaves the shell the
way that ends only the local side of an Erlang or IEx remote shell: Ctrl-G, then q at
the "-->" prompt.

usage: on_a_terminal.py TIMEOUT_S PROMPT_RE ANSWER_RE LINE COMMAND...

Prints what the terminal showed. Exit status: 0 if the answer came and the command
then exited with status 0, 1 if the answer did not come or the command failed, 2 if
it had to be killed at the deadline.
"""
import os
import pty
import re
import select
import signal
import sys
import time


def main():
    timeout, prompt, answer, line = sys.argv[1:5]
    command = sys.argv[5:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(command[0], command)
    deadline = time.monotonic() + float(timeout)
    seen = bytearray()

    def read_until(pattern, start):
        """Reads until `pattern` appears after `start`; its end, or None."""
        while time.monotonic() < deadline:
            match = re.search(pattern.encode(), seen[start:])
            if match:
                return start + match.end()
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    return None
                if not data:
                    return None
                seen.extend(data)
        return None

    answered = False
    at = read_until(prompt, 0)
    if at is not None:
        os.write(fd, line.encode() + b"\r")
        at = read_until(answer, at)
        answered = at is not None
    os.write(fd, b"\x07")
    if read_until(r"--> ", at or len(seen)) is not None:
        os.write(fd, b"q\r")
    status = None
    while time.monotonic() < deadline and status is None:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
                seen.extend(data)
            except OSError:
                pass
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(code)
    sys.stdout.write(seen.decode("utf-8", "replace"))
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        sys.exit(2)
    sys.exit(0 if answered and status == 0 else 1)


if __name__ == "__main__":
    main()
