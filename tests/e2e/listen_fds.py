"""Execs a program as systemd would start a service: the descriptors given
become 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set (the
pid stays this process's across exec). Used by fdstore.FakeSystemd.

    listen_fds.py FD NAME [FD NAME ...] -- PROGRAM ARGS...
"""
import os
import sys


def main():
    args = sys.argv[1:]
    sep = args.index("--")
    pairs, cmd = args[:sep], args[sep + 1:]
    fds = [int(x) for x in pairs[0::2]]
    names = pairs[1::2]
    # Out of the way first, so that no dup2 overwrites a descriptor still to move.
    high = [os.dup(fd) for fd in fds]
    moved = [fcntl_dupfd(fd, 1000 + i) for i, fd in enumerate(high)]
    for fd in high:
        os.close(fd)
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i, inheritable=True)
    for fd in moved:
        os.close(fd)
    env = dict(os.environ)
    if fds:
        env["LISTEN_FDS"] = str(len(fds))
        env["LISTEN_FDNAMES"] = ":".join(names)
        env["LISTEN_PID"] = str(os.getpid())
    os.execve(cmd[0], cmd, env)


def fcntl_dupfd(fd, at_least):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, at_least)


if __name__ == "__main__":
    main()
