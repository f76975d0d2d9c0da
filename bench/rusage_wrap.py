"""Run a command; write its wall time and peak RSS (getrusage(RUSAGE_CHILDREN)) as JSON.

    python -I -S bench/rusage_wrap.py OUT.json CMD [ARG ...]

Why a wrapper: on Linux, a process's ru_maxrss starts from the high-water mark of the
memory image it was exec'd from. A child that the benchmark's parent starts directly
therefore reports the parent's own peak (gigabytes, after building the pandas
references). This wrapper is a bare interpreter (-S: no site, standard library only,
~10 MiB), so its children's maxrss is theirs. It is the largest single process of the
command's tree: the command, or any of its descendants that it waited for.
"""

import json
import os
import resource
import sys
import time


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, os.environ)
    _, status = os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        json.dump({"rc": rc, "wall": wall, "maxrss": usage.ru_maxrss * 1024}, f)  # KiB on Linux
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
