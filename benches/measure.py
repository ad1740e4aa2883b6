"""Process measurements for scripts/bench.sh, from the kernel's own accounting.

    python3 benches/measure.py run OUT.json -- CMD [ARGS...]
        Runs CMD; SIGTERM and SIGINT are passed on. When it exits, writes its CPU seconds (user +
        system) and peak RSS (KiB) from wait4's rusage, its exit status, and its RSS sampled
        every 250 ms ([seconds, KiB] pairs), to OUT.json. CMD's pid is written to OUT.json.pid
        while it runs.
    python3 benches/measure.py threads PID OUT.json
        Writes the CPU seconds of each of PID's threads so far, summed by thread name with digits
        removed (librdkafka's rdk:broker1 and rdk:broker2 are one line), to OUT.json.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time


def run(out, cmd):
    child = subprocess.Popen(cmd)
    with open(out + ".pid", "w") as f:
        f.write(str(child.pid))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _: child.send_signal(s))
    samples, started = [], time.monotonic()

    def sample():
        while True:
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    rss = next((int(l.split()[1]) for l in f if l.startswith("VmRSS:")), None)
            except (FileNotFoundError, ProcessLookupError):
                return
            if rss is None:  # exited, not yet reaped
                return
            samples.append([round(time.monotonic() - started, 2), rss])
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    while True:
        try:
            _, status, usage = os.wait4(child.pid, 0)
            break
        except InterruptedError:
            continue
    with open(out, "w") as f:
        json.dump({"cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_kib": usage.ru_maxrss,
                   "status": os.waitstatus_to_exitcode(status), "rss_samples": samples}, f)


def threads(pid, out):
    tck = os.sysconf("SC_CLK_TCK")
    totals = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        # The name is in parentheses and may contain spaces; utime and stime follow it.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / tck
        key = re.sub(r"\d+", "", name).rstrip("-:") or name
        totals[key] = totals.get(key, 0.0) + cpu
    with open(out, "w") as f:
        json.dump(totals, f)


if __name__ == "__main__":
    if sys.argv[1] == "run" and sys.argv[3] == "--":
        run(sys.argv[2], sys.argv[4:])
    elif sys.argv[1] == "threads":
        threads(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(__doc__)
