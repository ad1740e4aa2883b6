"""Prints scripts/bench.sh's results from the files its runs left in WORK.

    python3 benches/report.py WORK EVENTS MEMORY_FACTOR
"""

import json
import os
import sys

work, events, factor = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def path(name):
    return os.path.join(work, name)


def run(name, total=events):
    seconds = float(open(path(f"{name}.seconds")).read())
    usage = json.load(open(path(f"{name}.json")))
    return {"rate": total / seconds, "seconds": seconds,
            "cpu_per_m": usage["cpu_seconds"] / total * 1e6, "rss": usage["peak_rss_kib"] / 1024}


def metrics(name):
    """{(metric, labels): value} from a Prometheus text file."""
    out = {}
    if not os.path.exists(path(f"{name}.metrics")):
        return out
    for line in open(path(f"{name}.metrics")):
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, labels = key.partition("{")
        out[(metric, labels.rstrip("}"))] = float(value)
    return out


def metric_sum(m, metric, **labels):
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for (name, ls), v in m.items() if name == metric and all(w in ls for w in want))


# The runs made (BENCH_ONLY may leave some out).
runs = {name: run(name) for name in ("bare", "parquet", "full", "noagg", "busy", "python")
        if os.path.exists(path(f"{name}.seconds"))}
labels = {
    "bare": "(c) bare rdkafka consumer: join, count, commit",
    "parquet": "(b) sluice: Parquet + dead letters",
    "full": "(a) sluice: Parquet+DLQ+Redis+aggregates+scoring",
    "noagg": "(a0) sluice: (a) without the aggregate views",
    "busy": "(a) with the inference API serving 8 clients",
    "python": "(d) Python: same job as (a0)",
}
print()
print(f"{events:,} events pre-loaded (3% broken), 4 partitions; {os.cpu_count()} CPUs")
print(f"{'run':<50} {'events/s':>10} {'seconds':>8} {'CPU s/M ev':>11} {'peak RSS':>10}")
for key, r in runs.items():
    print(f"{labels[key]:<50} {r['rate']:>10,.0f} {r['seconds']:>8.1f} {r['cpu_per_m']:>11.1f} {r['rss']:>7.0f} MiB")
print()
ratio = lambda a, b: runs[a]["rate"] / runs[b]["rate"]
cpu = lambda a, b: runs[b]["cpu_per_m"] / runs[a]["cpu_per_m"]
for a, b, text, f, unit, goal in [
    ("full", "noagg", "(a) / (a0) with aggregates vs without:      ", ratio, " ", "    (goal: at least 0.8)"),
    ("noagg", "python", "(a0) / (d) sluice vs Python, same job:       ", ratio, "x", "   (goal: at least 10)"),
    ("full", "python", "(a) / (d)  sluice with aggregates vs Python: ", ratio, "x", ""),
    ("full", "bare", "(a) / (c)  sluice full job vs bare consumer: ", ratio, " ", ""),
    ("parquet", "bare", "(b) / (c)  sluice Parquet vs bare consumer:  ", ratio, " ", "    (goal: at least 0.6)"),
    ("parquet", "python", "(b) / (d)  sluice Parquet vs Python full job:", ratio, "x", ""),
    ("full", "python", "CPU per event, (d) / (a):                    ", cpu, "x", ""),
]:
    if a in runs and b in runs:
        print(f"{text}{f(a, b):>6.2f}{unit}{goal}")

def redis_cpu(name, total=events):
    """Redis CPU seconds per million events of a run."""
    before = float(open(path(f"{name}.redis-cpu-before")).read())
    after = float(open(path(f"{name}.redis-cpu-after")).read())
    return (after - before) / total * 1e6


print()
print("Redis (emptied before each run):")
for key in (k for k in ("full", "noagg", "python") if k in runs):
    print(f"  {labels[key]:<50} Redis CPU {redis_cpu(key):>6.1f} s per million events")
memory = json.load(open(path("full.redis-memory"))) if "full" in runs else {}
for prefix, m in memory.items():
    print(f"  after (a), {prefix:<6} {m['keys']:>7,} keys, {m['mean_bytes']:>8,.0f} bytes and {m['mean_fields']:>5.1f} fields each (MEMORY USAGE, mean of up to 500)")


def rss_over_time(name, seconds):
    """Peak RSS (MiB) in each fifth of the drain, from the 250 ms samples."""
    samples = json.load(open(path(f"{name}.json"))).get("rss_samples", [])
    fifths = []
    for i in range(5):
        lo, hi = seconds * i / 5, seconds * (i + 1) / 5
        inside = [kib for t, kib in samples if lo <= t < hi]
        fifths.append(max(inside) / 1024 if inside else float("nan"))
    return " ".join(f"{m:>5.0f}" for m in fifths)


if factor > 0 and "full" in runs:
    name = f"full-x{factor}"
    big = run(name, events * factor)
    print()
    print(f"Memory of (a): peak RSS on {events:,} events {runs['full']['rss']:.0f} MiB; on {events * factor:,} "
          f"({factor}x, {big['rate']:,.0f} events/s) {big['rss']:.0f} MiB: ratio {big['rss'] / runs['full']['rss']:.2f}"
          " (goal: independent of the backlog)")
    print(f"  peak RSS (MiB) in each fifth of the drain, {events:,} events:  {rss_over_time('full', runs['full']['seconds'])}")
    print(f"  peak RSS (MiB) in each fifth of the drain, {events * factor:,} events:  {rss_over_time(name, big['seconds'])}")

for name in ("full", "noagg", "parquet"):
    m = metrics(name)
    if not m:
        continue
    print()
    print(f"Where the time goes in {labels[name]}, from sluice_stage_seconds (wall time per stage):")
    stages = ["decode", "features", "redis", "parquet_write", "parquet_finish", "commit", "records"]
    rows = [(s, metric_sum(m, "sluice_stage_seconds_sum", stage=s), metric_sum(m, "sluice_stage_seconds_count", stage=s))
            for s in stages]
    rows.insert(2, ("model (forward passes)", metric_sum(m, "sluice_model_inference_seconds_sum"),
                    metric_sum(m, "sluice_model_inference_seconds_count")))
    print(f"  {'stage':<24} {'seconds':>8} {'µs/event':>9} {'calls':>8}")
    for stage, secs, calls in rows:
        if calls:
            print(f"  {stage:<24} {secs:>8.2f} {secs / events * 1e6:>9.2f} {calls:>8.0f}")
    print("  (decode on its own thread; features, redis, parquet_* and commit on the pipeline task in")
    print("   turn; the model on its own thread; records when predictions are built, beside it)")
    if os.path.exists(path(f"{name}.threads")):
        threads = json.load(open(path(f"{name}.threads")))
        total = sum(threads.values())
        print(f"  CPU by thread, {total:.1f} s in all:")
        for thread, secs in sorted(threads.items(), key=lambda kv: -kv[1]):
            if secs >= 0.05:
                print(f"    {thread:<22} {secs:>7.2f} s  {secs / total:>5.1%}")

if os.path.exists(path("score-sluice.json")):
    s = json.load(open(path("score-sluice.json")))
    p = json.load(open(path("score-python.json")))
    print()
    print(f"The scoring stage alone, {s['rows']:,} rows, batch {s['max_batch']}, model {s['model']} v{s['version']}:")
    print(f"  sluice (Arrow -> features -> model threads):  {s['rows_per_second']:>12,.0f} rows/s")
    print(f"  Python (dicts -> features -> TorchScript):    {p['rows_per_second']:>12,.0f} rows/s")
    print(f"  Python, forward passes only:                  {p['forward_only_rows_per_second']:>12,.0f} rows/s")
    print(f"  ratio sluice / Python:                        {s['rows_per_second'] / p['rows_per_second']:.2f}")
    if os.path.exists(path("score-sluice-training.json")):
        t = json.load(open(path("score-sluice-training.json")))
        load = json.load(open(path("train-load.json")))
        print(f"  sluice with a trainer beside it:              {t['rows_per_second']:>12,.0f} rows/s"
              f"  (ratio {t['rows_per_second'] / s['rows_per_second']:.2f} of alone)")
        print(f"  the trainer meanwhile:                        {load['examples_per_second']:>12,.0f} examples/s"
              f"  ({load['rounds']} rounds)")

def latency_buckets(name):
    m = metrics(name)
    return {(float("inf") if ls.split('le="')[1].rstrip('"') == "+Inf" else float(ls.split('le="')[1].rstrip('"'))): v
            for (metric, ls), v in m.items() if metric == "sluice_prediction_latency_seconds_bucket"}


def quantiles(buckets):
    """p50 and p99 (seconds) of a cumulative histogram {le: count}, interpolated in buckets."""
    points = sorted(buckets.items())
    total = points[-1][1] if points else 0

    def q(p):
        prev_le, prev_n = 0.0, 0.0
        for le, n in points:
            if n >= p * total:
                if le == float("inf"):
                    return prev_le
                return prev_le + (le - prev_le) * (p * total - prev_n) / max(n - prev_n, 1e-9)
            prev_le, prev_n = le, n
        return float("nan")

    return q(0.5), q(0.99), total


if os.path.exists(path("live.rate")):
    rate = int(open(path("live.rate")).read())
    whole = latency_buckets("live")
    if whole:
        print()
        why = open(path("live.why")).read().strip() if os.path.exists(path("live.why")) else "half of (a)"
        print(f"Prediction latency at {rate:,} events/s ({why}), per prediction, from its batch's "
              "first event's consumption to the broker's acknowledgement:")
        p50, p99, n = quantiles(whole)
        print(f"  the whole run:          p50 {p50 * 1000:6.1f} ms, p99 {p99 * 1000:6.1f} ms ({n:,.0f} predictions)")
        warm = latency_buckets("live-warm")
        if warm:
            p50, p99, n = quantiles({le: v - warm.get(le, 0.0) for le, v in whole.items()})
            print(f"  after the first {os.environ.get('BENCH_LIVE_WARMUP', '5')} s:      "
                  f"p50 {p50 * 1000:6.1f} ms, p99 {p99 * 1000:6.1f} ms ({n:,.0f} predictions)")
        if os.path.exists(path("live.cpu")) and os.path.exists(path("live.events")):
            cpu = float(open(path("live.cpu")).read())
            events = int(open(path("live.events")).read())
            print(f"  sluice's CPU:           {cpu:.1f} s, {cpu / events * 1e6:.1f} s per million events")
            if os.path.exists(path("live.redis-cpu-after")):
                print(f"  Redis CPU:              {redis_cpu('live', events):.1f} s per million events")
        # Where the time goes after the warm-up: the pipeline task's stages (all but decode, which
        # has its own thread) run in turn, so their share of the wall time says how busy it is.
        live, warm_m = metrics("live"), metrics("live-warm")
        if warm_m:
            diff = lambda metric, **kv: metric_sum(live, metric, **kv) - metric_sum(warm_m, metric, **kv)
            batches = diff("sluice_stage_seconds_count", stage="decode")
            scored = n if warm else 0  # predictions after the warm-up (from the quantiles above)
            wall = float(open(path("live.time")).read()) - float(open(path("live-warm.time")).read())
            if batches and wall > 0:
                print(f"  after the first {os.environ.get('BENCH_LIVE_WARMUP', '5')} s ({wall:.1f} s): {batches:,.0f} batches, "
                      f"{scored / batches:,.0f} predictions each on average; per batch, and share of the wall time:")
                for stage in ["decode", "features", "redis", "parquet_write", "parquet_finish", "commit"]:
                    secs = diff("sluice_stage_seconds_sum", stage=stage)
                    if secs > 0:
                        where = "decode thread" if stage == "decode" else "pipeline task"
                        print(f"    {stage:<16} {secs / batches * 1000:>7.2f} ms  {secs / wall:>6.1%}  ({where})")
                # A prediction's latency, in the order its batch goes through: these overlap
                # other batches' work, so only their mean per batch is shown.
                print("  a batch's path, mean ms after the warm-up (redis as above):")
                for stage, what in [("waiting", "first event consumed until the pipeline task takes the batch"),
                                    ("scoring", "queued at the model until its last result"),
                                    ("records", "prediction and feedback records built"),
                                    ("deliver", "records sent until the broker acknowledged them")]:
                    secs = diff("sluice_stage_seconds_sum", stage=stage)
                    calls = diff("sluice_stage_seconds_count", stage=stage)
                    if calls > 0:
                        print(f"    {stage:<16} {secs / calls * 1000:>7.2f} ms  ({what})")

if os.path.exists(path("busy-load.json")) and "busy" in runs:
    b = json.load(open(path("busy-load.json")))
    print()
    print("The stream beside the inference API (8 closed-loop clients, one row each):")
    if "full" in runs:
        print(f"  stream rate {runs['busy']['rate']:,.0f} events/s, {ratio('busy', 'full'):.2f} of (a) alone")
    print(f"  requests meanwhile: {b['requests_per_second']:,.0f}/s, p50 {b['p50_ms']:.2f} ms, "
          f"p99 {b['p99_ms']:.2f} ms, {b['errors']} errors")

serve = {(s, c): json.load(open(path(f"serve-{s}-{c}.json")))
         for s in ("sluice", "fastapi") for c in (1, 8, 64)
         if os.path.exists(path(f"serve-{s}-{c}.json"))}
if serve:
    print()
    print("The inference API (REST, the model's tensor, one row per request), same load generator:")
    print(f"  {'server':<46} {'clients':>7} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    names = {"sluice": "sluice (its pipeline idle)",
             "fastapi": f"FastAPI + uvicorn + TorchScript, {os.cpu_count()} workers"}
    for (s, c), f in sorted(serve.items(), key=lambda kv: (kv[0][0] != "sluice", kv[0][1])):
        print(f"  {names[s]:<46} {c:>7} {f['requests_per_second']:>11,.0f} {f['p50_ms']:>8.2f} "
              f"{f['p99_ms']:>8.2f} {f['errors']:>7}")
    for c in (1, 8, 64):
        if ("sluice", c) in serve and ("fastapi", c) in serve:
            a, b = serve[("sluice", c)], serve[("fastapi", c)]
            print(f"  at {c} clients: sluice {a['requests_per_second'] / b['requests_per_second']:.1f}x "
                  f"the requests/s, p99 {a['p99_ms']:.2f} vs {b['p99_ms']:.2f} ms")
