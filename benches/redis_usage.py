"""Redis's side of a benchmark run, read with redis-py (benches/requirements.txt).

    python3 benches/redis_usage.py URL cpu            CPU seconds the server has used
    python3 benches/redis_usage.py URL memory OUT     per key prefix (`cust:`, `vel:`, ...):
                                                      keys, and the mean MEMORY USAGE of up to
                                                      500 of them, as JSON in OUT
"""

import json
import sys

import redis

url, command = sys.argv[1], sys.argv[2]
r = redis.Redis.from_url(url)
if command == "cpu":
    info = r.info("cpu")
    print(info["used_cpu_sys"] + info["used_cpu_user"])
else:
    prefixes = {}
    for key in r.scan_iter(count=1000):
        prefix = key.decode().split(":", 1)[0] + ":"
        prefixes.setdefault(prefix, []).append(key)
    out = {}
    for prefix, keys in sorted(prefixes.items()):
        sample = keys[:500]
        sizes = [r.memory_usage(k, samples=0) or 0 for k in sample]
        fields = [r.hlen(k) for k in sample]
        out[prefix] = {"keys": len(keys), "mean_bytes": sum(sizes) / len(sizes),
                       "mean_fields": sum(fields) / len(fields)}
    json.dump(out, open(sys.argv[3], "w"))
