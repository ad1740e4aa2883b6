#!/usr/bin/env bash
# Benchmark, on one pre-loaded topic, back to back in the same run:
#   1. a bare rdkafka consumer that only counts (the client's own limit here);
#   2. sluice, Kafka -> Parquet (zstd) + dead letters;
#   3. sluice, Kafka -> Parquet + dead letters + features in Redis;
#   4. sluice, the whole of pipelines/orders.toml: Parquet + DLQ + Redis + fraud scores
#      (TorchScript) with predictions and feedback on Kafka;
#   5. redis-benchmark, pipelined HSET on the same Redis (the server's own limit here);
#   6. the scoring stage alone: sluice (`sluice-bench score`: Arrow -> features -> model
#      threads) against PyTorch in Python (models/fraud.py bench), same model, batch size and
#      rows, one intra-op thread each;
#   7. latency of predictions (consumption of a batch's first event -> prediction acknowledged
#      by the broker) with events produced live at half the rate of run 4.
# Prints events/s, CPU seconds per million events, peak RSS and ratios; asserts nothing.
#
#   BENCH_EVENTS  events to pre-load (default 300000)
#   KAFKA_BOOTSTRAP  use this broker instead of starting one
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

EVENTS="${BENCH_EVENTS:-300000}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")"
cleanup() {
  [ -n "${SLUICE_PID:-}" ] && kill "$SLUICE_PID" 2>/dev/null || true
  [ -n "${TANSU_PID:-}" ] && kill "$TANSU_PID" 2>/dev/null || true
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say "Building (release)"
cargo build --release --locked --bins >&2
BIN="$CARGO_TARGET_DIR/release"
# tansu 0.6's SQLite engine stops serving fetches when a topic is produced to (the dead
# letters) while another is drained fast at this volume; its memory engine does not, but
# reports low high watermarks, so completion is judged by the committed total instead.
start_broker "$WORK/broker" "memory://tansu/"
start_redis "$WORK/redis"
RUN_ID="$(date +%s)"
export ORDERS_TOPIC="bench-$RUN_ID" ORDERS_DLQ="bench-$RUN_ID.dlq" ORDERS_IDLE_FLUSH="250ms"
export FRAUD_TOPIC="bench-$RUN_ID.fraud" FRAUD_FEEDBACK_TOPIC="bench-$RUN_ID.fraud.feedback"
"$BIN/sluice-bench" create-topic "$ORDERS_TOPIC" --partitions 4
"$BIN/sluice-bench" create-topic "$ORDERS_DLQ" --partitions 1
"$BIN/sluice-bench" create-topic "$FRAUD_TOPIC" --partitions 4
"$BIN/sluice-bench" create-topic "$FRAUD_FEEDBACK_TOPIC" --partitions 4
say "Pre-loading $EVENTS events"
"$BIN/sluice-bench" generate "$ORDERS_TOPIC" --count "$EVENTS" >"$WORK/generate.json"

say "1. bare rdkafka consumer that only counts"
"$BIN/sluice-bench" drain "$ORDERS_TOPIC" --expect "$EVENTS" | tee "$WORK/drain.json"

# Runs sluice on pipeline $1 with a fresh group until every event is committed; writes
# "seconds cpu_ticks peak_kib" to $WORK/$2.run and the final metrics to $WORK/$2.metrics.
run_sluice() {
  local pipeline="$1" name="$2" port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export ORDERS_GROUP="bench-$RUN_ID-$name" ORDERS_OUTPUT="$WORK/out-$name"
  local start end
  start=$(date +%s.%N)
  "$BIN/sluice" run "$pipeline" --listen "127.0.0.1:$port" 2>"$WORK/$name.log" &
  SLUICE_PID=$!
  "$BIN/sluice-bench" wait-committed "$ORDERS_TOPIC" --group "$ORDERS_GROUP" --total "${3:-$EVENTS}" --timeout-secs 1800
  end=$(date +%s.%N)
  curl -s "127.0.0.1:$port/metrics" >"$WORK/$name.metrics"
  echo "$(python3 -c "print($end - $start)") $(awk '{print $14 + $15}' "/proc/$SLUICE_PID/stat") \
$(awk '/VmHWM/ {print $2}' "/proc/$SLUICE_PID/status")" >"$WORK/$name.run"
  kill -TERM "$SLUICE_PID"; wait "$SLUICE_PID"; SLUICE_PID=""
}

say "2. sluice: Kafka -> decode/validate -> Parquet (zstd) + dead letters"
sed '/^\[sink.redis\]/,$d' pipelines/orders.toml >"$WORK/parquet-only.toml"
sed -i "s|^schema = \"../schemas/|schema = \"$PWD/schemas/|" "$WORK/parquet-only.toml"
run_sluice "$WORK/parquet-only.toml" parquet

say "3. sluice: the same + features in Redis"
sed '/^# Scoring:/,$d' pipelines/orders.toml >"$WORK/redis.toml"
sed -i "s|^schema = \"../schemas/|schema = \"$PWD/schemas/|" "$WORK/redis.toml"
run_sluice "$WORK/redis.toml" redis

say "4. sluice: the same + fraud scores, predictions and feedback on Kafka"
run_sluice pipelines/orders.toml scoring

say "6. the scoring stage: sluice against PyTorch in Python, same model and batch size"
"$BIN/sluice-bench" score pipelines/orders.toml --rows 200000 | tee "$WORK/score-sluice.json"
python3 models/fraud.py bench models/fraud/1/model.pt --rows 200000 --batch 256 | tee "$WORK/score-python.json"

say "7. latency at half the rate of run 4, events produced live"
RATE=$(python3 -c "secs=float(open('$WORK/scoring.run').read().split()[0]); print(round($EVENTS / secs / 2))")
LIVE=$((RATE * 20))
export ORDERS_TOPIC="bench-$RUN_ID-live"
"$BIN/sluice-bench" create-topic "$ORDERS_TOPIC" --partitions 4
"$BIN/sluice-bench" generate "$ORDERS_TOPIC" --count "$LIVE" --rate "$RATE" >"$WORK/live.json" &
GEN_PID=$!
run_sluice pipelines/orders.toml live "$LIVE"
wait "$GEN_PID"
echo "$RATE" >"$WORK/live.rate"

say "5. redis-benchmark: pipelined HSET (pipeline of 500), same server"
PORT="${REDIS_URL##*:}"
redis-benchmark -p "$PORT" -t hset -n 1000000 -P 500 -r 5000 -q 2>/dev/null | tr '\r' '\n' | grep -i "HSET" | tail -1 | tee "$WORK/redis-benchmark.txt"

python3 - "$WORK" "$EVENTS" "$(getconf CLK_TCK)" <<'PY'
import json, re, sys
work, events, tck = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
drain = json.load(open(f"{work}/drain.json"))
def run(name):
    secs, ticks, kib = open(f"{work}/{name}.run").read().split()
    return float(secs), int(ticks) / tck, int(kib) / 1024
def metric(name, key):
    total = 0.0
    for line in open(f"{work}/{name}.metrics"):
        if line.startswith(key):
            total += float(line.rsplit(" ", 1)[1])
    return total
pq, rd, sc = run("parquet"), run("redis"), run("scoring")
hset = float(re.search(r"([\d.]+) requests per second", open(f"{work}/redis-benchmark.txt").read()).group(1))
rows = metric("redis", "sluice_redis_rows_total") + metric("redis", "sluice_redis_rows_stale_total")
write_secs = metric("redis", "sluice_redis_write_seconds_sum")
print()
print(f"{'run':<46} {'events/s':>10} {'seconds':>8} {'CPU s/M ev':>11} {'peak RSS':>9}")
print(f"{'1. bare rdkafka consumer (count only)':<46} {drain['events_per_second']:>10,.0f} {drain['seconds']:>8.1f}")
for label, (secs, cpu, rss) in [("2. sluice: Parquet zstd + DLQ", pq), ("3. sluice: Parquet + DLQ + Redis features", rd),
                                 ("4. sluice: Parquet + DLQ + Redis + scoring", sc)]:
    print(f"{label:<46} {events / secs:>10,.0f} {secs:>8.1f} {cpu / events * 1e6:>11.1f} {rss:>7.0f}MiB")
print()
print(f"ratio 2 / 1 (Parquet vs bare consumer):        {events / pq[0] / drain['events_per_second']:.2f}")
print(f"ratio 3 / 2 (with Redis vs Parquet only):      {pq[0] / rd[0]:.2f}")
if write_secs > 0:
    print(f"Redis sink: {rows:,.0f} coalesced writes in {write_secs:.2f} s of write time = {rows / write_secs:,.0f} rows/s")
print(f"redis-benchmark pipelined HSET:                {hset:,.0f} requests/s")
if write_secs > 0:
    print(f"ratio Redis sink / redis-benchmark HSET:       {rows / write_secs / hset:.2f}")
print(f"ratio 4 / 3 (with scoring vs without):        {rd[0] / sc[0]:.2f}")
print(f"predictions produced in run 4:                 {metric('scoring', 'sluice_predictions_total'):,.0f}")
print("(sluice's times include joining the group, the last idle flush and 200 ms commit polling)")
s_ = json.load(open(f"{work}/score-sluice.json"))
p_ = json.load(open(f"{work}/score-python.json"))
print()
print(f"6. scoring stage, {s_['rows']:,} rows, batch {s_['max_batch']}, model {s_['model']} v{s_['version']} on {s_['device']}:")
print(f"   sluice (Arrow -> features -> model threads):  {s_['rows_per_second']:>12,.0f} rows/s")
print(f"   Python (dicts -> features -> TorchScript):    {p_['rows_per_second']:>12,.0f} rows/s")
print(f"   Python, forward passes only (no encoding):    {p_['forward_only_rows_per_second']:>12,.0f} rows/s")
print(f"   ratio sluice / Python:                        {s_['rows_per_second'] / p_['rows_per_second']:.2f}")
# Latency: quantiles interpolated in the histogram's buckets.
buckets = []
for line in open(f"{work}/live.metrics"):
    if line.startswith("sluice_prediction_latency_seconds_bucket"):
        le = line.split('le="')[1].split('"')[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
buckets.sort()
def quantile(q):
    total = buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= q * total:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (q * total - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
if buckets:
    rate = open(f"{work}/live.rate").read().strip()
    print(f"7. latency at {int(rate):,} events/s (half of run 4), per batch from its first event's consumption")
    print(f"   to the broker's acknowledgement of its predictions: p50 {quantile(0.5) * 1000:.0f} ms, p99 {quantile(0.99) * 1000:.0f} ms"
          f" ({buckets[-1][1]:.0f} batches; batch.max_delay is 500 ms)")
PY
