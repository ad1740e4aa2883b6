#!/usr/bin/env bash
# Benchmark: Kafka -> Parquet (zstd) events/s of sluice against the raw drain rate of the same
# topic by a bare rdkafka consumer that only counts, in the same run, plus sluice's peak RSS.
# Prints figures; asserts nothing.
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
RUN_ID="$(date +%s)"
export ORDERS_TOPIC="bench-$RUN_ID" ORDERS_DLQ="bench-$RUN_ID.dlq" ORDERS_GROUP="sluice-bench-$RUN_ID"
export ORDERS_OUTPUT="$WORK/out" ORDERS_IDLE_FLUSH="250ms"
"$BIN/sluice-bench" create-topic "$ORDERS_TOPIC" --partitions 4
"$BIN/sluice-bench" create-topic "$ORDERS_DLQ" --partitions 1
say "Pre-loading $EVENTS events"
"$BIN/sluice-bench" generate "$ORDERS_TOPIC" --count "$EVENTS" >"$WORK/generate.json"

say "Baseline: bare rdkafka consumer that only counts"
"$BIN/sluice-bench" drain "$ORDERS_TOPIC" --expect "$EVENTS" | tee "$WORK/drain.json"

say "sluice: Kafka -> decode/validate -> Parquet (zstd) + dead letters"
START=$(date +%s.%N)
"$BIN/sluice" run pipelines/orders.toml --listen 127.0.0.1:0 2>"$WORK/sluice.log" &
SLUICE_PID=$!
"$BIN/sluice-bench" wait-committed "$ORDERS_TOPIC" --group "$ORDERS_GROUP" --total "$EVENTS" --timeout-secs 1800
END=$(date +%s.%N)
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$SLUICE_PID/status")
CPU_TICKS=$(awk '{print $14 + $15}' "/proc/$SLUICE_PID/stat")
kill -TERM "$SLUICE_PID"; wait "$SLUICE_PID"; SLUICE_PID=""

python3 - "$WORK/drain.json" "$START" "$END" "$EVENTS" "$RSS_KB" "$CPU_TICKS" "$(getconf CLK_TCK)" <<'PY'
import json, sys
drain = json.load(open(sys.argv[1]))
start, end, events = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rss_mib, cpu_s = int(sys.argv[5]) / 1024, int(sys.argv[6]) / int(sys.argv[7])
secs = end - start
rate = events / secs
print()
print(f"{'run':<40} {'events/s':>12} {'seconds':>9} {'CPU s/M events':>15} {'peak RSS':>10}")
print(f"{'bare rdkafka consumer (count only)':<40} {drain['events_per_second']:>12,.0f} {drain['seconds']:>9.1f} {'':>15} {'':>10}")
print(f"{'sluice Kafka -> Parquet zstd + DLQ':<40} {rate:>12,.0f} {secs:>9.1f} {cpu_s / events * 1e6:>15.1f} {rss_mib:>8.0f}MiB")
print(f"\nratio sluice / bare consumer: {rate / drain['events_per_second']:.2f}")
print("(sluice's time includes joining the consumer group and finishing the last files)")
PY
