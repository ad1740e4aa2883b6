#!/usr/bin/env bash
# The benchmark: sluice against what users would run instead, on the same machine, broker and
# Redis, back to back in one run. Pre-loads BENCH_EVENTS demo events (3% broken) and drains them
# with, each in a fresh consumer group:
#   (c) a bare rdkafka consumer that joins the group, counts and commits (the client's limit);
#   (b) sluice, Parquet (zstd, dt/hour partitions) + dead letters;
#   (a) sluice, the whole of pipelines/orders.toml: Parquet + dead letters + Redis features +
#       two aggregate views of three windows each, read back as model inputs + fraud scores
#       (TorchScript) with predictions and feedback on Kafka;
#   (a0) the same without the aggregate views (the model's aggregate inputs replaced by the
#       amount, so that the model does the same work);
#   (d) benches/python_pipeline.py: the job of (a0) in Python (confluent-kafka, orjson,
#       pyarrow, redis-py, torch), same model, Redis layout, topics and Parquet layout.
# Redis is emptied before each run; its CPU seconds over the run, and after (a) the memory per
# entity of each view (MEMORY USAGE), are recorded.
# Every run is timed from its process's start to the moment the broker holds its commit of the
# last event, the same way for all four; CPU seconds and peak RSS come from the kernel (wait4).
# Then (a) drains a backlog BENCH_MEMORY_FACTOR times larger, to compare peak RSS. Prints one
# table, the ratios, and sluice's per-stage profile (its sluice_stage_seconds metrics and the
# CPU of its threads). Asserts nothing.
#
#   BENCH_EVENTS         events to pre-load (default 1000000)
#   BENCH_MEMORY_FACTOR  size of the memory run's backlog, in BENCH_EVENTS (default 5; 0 skips it)
#   BENCH_EXTRA=1        also: the scoring stage alone against PyTorch in Python, then beside a
#                        trainer fine-tuning the model (TRAIN_THREADS libtorch threads, default
#                        1)
# The latency run (in the default set): sluice started and ready first, then events produced
# live at half the rate of (a); prints p50/p99 from consumption to acknowledged prediction.
# The busy run: (a) with the inference API answering 8 clients meanwhile. The serve run: the
# inference API against FastAPI + uvicorn + TorchScript at 1, 8 and 64 clients.
#   BENCH_ONLY           run only these of bare, parquet, full, noagg, busy, python, latency,
#                        serve (space-separated; default all); the report shows the runs made
#   BENCH_SERVE_SECONDS  seconds per concurrency level of the serve run (default 10)
#   BENCH_RATE           the latency run's event rate (default: half the rate of full)
#   BENCH_LIVE_SECONDS   how long the latency run produces events (default 20)
#   BENCH_LIVE_WARMUP    seconds of it the report also leaves out (default 5)
#   BENCH_LIVE_PIPELINE  the latency run's pipeline: full (default, pipelines/orders.toml) or
#                        noagg (the same without the aggregate views, as (a0))
#   BENCH_BIN            run the binaries in this folder instead of this checkout's build
#   BENCH_KEEP=1         keep the work folder (logs, metrics scraped from each run) and say where
#   KAFKA_BOOTSTRAP / REDIS_URL  use this broker / Redis instead of starting one
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
step bench-python-packages "the Python baseline's packages, benches/requirements.txt (20 seconds the first time)" \
  python3 -m pip install --disable-pip-version-check --progress-bar off -r benches/requirements.txt

EVENTS="${BENCH_EVENTS:-1000000}"
FACTOR="${BENCH_MEMORY_FACTOR:-5}"
start_demo sluice-bench
# Another build's binaries (sluice and sluice-bench), to compare two builds on one machine.
BIN="${BENCH_BIN:-$BIN}"
# The benchmark's folder holds only its measurements' raw files: removed at exit too, unless
# BENCH_KEEP=1.
trap 'stop_demo; if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi' EXIT
RUN_ID="$(date +%s)"
export ORDERS_DLQ="bench-$RUN_ID.dlq" ORDERS_IDLE_FLUSH="250ms"
export FRAUD_TOPIC="bench-$RUN_ID.fraud" FRAUD_FEEDBACK_TOPIC="bench-$RUN_ID.fraud.feedback"
for t in "$ORDERS_DLQ:1" "$FRAUD_TOPIC:4" "$FRAUD_FEEDBACK_TOPIC:4"; do
  "$BIN/sluice-bench" create-topic "${t%:*}" --partitions "${t##*:}"
done
# pipelines/orders.toml up to its Redis sink: Parquet and dead letters only.
sed '/^\[sink.redis\]/,$d' pipelines/orders.toml >"$WORK/parquet-only.toml"
sed -i "s|^schema = \"../schemas/|schema = \"$PWD/schemas/|" "$WORK/parquet-only.toml"
# pipelines/orders.toml without its aggregate views; the model's aggregate inputs read the
# amount instead, so that it stays as wide.
python3 - "$PWD" "$WORK/no-aggregates.toml" <<'PY'
import re, sys
root, out = sys.argv[1], sys.argv[2]
text = open(f"{root}/pipelines/orders.toml").read()
text = re.sub(r"\[\[sink\.redis\.aggregates\]\].*?(?=\n# Scoring|\n\[\[sink\.redis\.aggregates\]\])", "", text, flags=re.S)
text = re.sub(r'\{ aggregate = "[^"]+", null = [0-9.]+ \}', '{ column = "amount" }', text)
text = text.replace('"../schemas/', f'"{root}/schemas/').replace(":-../models/fraud}", f":-{root}/models/fraud}}")
assert "{ aggregate =" not in text and "[[sink.redis.aggregates]]" not in text, "aggregates left"
open(out, "w").write(text)
PY

# preload TOPIC COUNT
preload() {
  say "Pre-loading $2 events into $1"
  "$BIN/sluice-bench" create-topic "$1" --partitions 4
  "$BIN/sluice-bench" generate "$1" --count "$2" >"$WORK/generate-$1.json"
}

# measure NAME TOPIC TOTAL CMD...: runs CMD (which consumes TOPIC as group bench-RUN_ID-NAME)
# until the group has committed TOTAL events. Writes NAME.seconds, NAME.json (CPU, peak RSS),
# and for sluice NAME.metrics and NAME.threads.
measure() {
  local name="$1" topic="$2" total="$3"; shift 3
  local start end pid
  redis-cli -u "$REDIS_URL" FLUSHALL >/dev/null
  python3 benches/redis_usage.py "$REDIS_URL" cpu >"$WORK/$name.redis-cpu-before"
  start=$(date +%s.%N)
  python3 benches/measure.py run "$WORK/$name.json" -- "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  SLUICE_PID=$!
  "$BIN/sluice-bench" wait-committed "$topic" --group "bench-$RUN_ID-$name" --total "$total" \
    --timeout-secs 3600 --while-running "$SLUICE_PID"
  end=$(date +%s.%N)
  python3 -c "print($end - $start)" >"$WORK/$name.seconds"
  python3 benches/redis_usage.py "$REDIS_URL" cpu >"$WORK/$name.redis-cpu-after"
  python3 benches/redis_usage.py "$REDIS_URL" memory "$WORK/$name.redis-memory"
  if [ -n "${METRICS_PORT:-}" ]; then
    curl -s "127.0.0.1:$METRICS_PORT/metrics" >"$WORK/$name.metrics"
  fi
  pid=$(cat "$WORK/$name.json.pid")
  if [ -d "/proc/$pid" ]; then python3 benches/measure.py threads "$pid" "$WORK/$name.threads"; fi
  kill -TERM "$SLUICE_PID" 2>/dev/null || true
  wait "$SLUICE_PID" || true
  SLUICE_PID=""
  echo "  $(python3 -c "print(f'{$total / float(open(\"$WORK/$name.seconds\").read()):,.0f}')") events/s" >&2
}

# sluice NAME TOPIC TOTAL PIPELINE [ARGS...]
sluice() {
  local name="$1" topic="$2" total="$3" pipeline="$4"
  shift 4
  METRICS_PORT=$(free_port)
  ORDERS_TOPIC="$topic" ORDERS_GROUP="bench-$RUN_ID-$name" ORDERS_OUTPUT="$WORK/out-$name" \
    measure "$name" "$topic" "$total" "$BIN/sluice" run "$pipeline" \
    --listen "127.0.0.1:$METRICS_PORT" "$@"
  METRICS_PORT=""
}

# runs NAME: whether BENCH_ONLY (default: every run) names NAME.
runs() { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]; }

TOPIC="bench-$RUN_ID"
preload "$TOPIC" "$EVENTS"

runs bare && say "(c) bare rdkafka consumer: join the group, count, commit" &&
measure bare "$TOPIC" "$EVENTS" "$BIN/sluice-bench" drain "$TOPIC" --expect "$EVENTS" \
  --group "bench-$RUN_ID-bare"

runs parquet && say "(b) sluice: Parquet + dead letters" &&
sluice parquet "$TOPIC" "$EVENTS" "$WORK/parquet-only.toml"

runs full && say "(a) sluice: Parquet + dead letters + Redis + aggregates + scoring, predictions and feedback" &&
sluice full "$TOPIC" "$EVENTS" pipelines/orders.toml

runs noagg && say "(a0) sluice: the same without the aggregate views" &&
sluice noagg "$TOPIC" "$EVENTS" "$WORK/no-aggregates.toml"

# (a) with the inference API serving 8 closed-loop clients while it drains the same backlog:
# the stream's rate beside requests, and the requests' latency beside the stream.
if runs busy; then
  say "(a) again, with the inference API serving 8 clients meanwhile"
  HTTP_PORT=$(free_port)
  (
    for _ in $(seq 600); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$HTTP_PORT/v2/health/ready")" = 200 ] && break
      sleep 0.1
    done
    "$BIN/sluice-bench" load "http://127.0.0.1:$HTTP_PORT" --concurrency 8 --seconds 6 --warmup 1 \
      >"$WORK/busy-load.json"
  ) &
  LOAD_PID=$!
  sluice busy "$TOPIC" "$EVENTS" pipelines/orders.toml --inference-http "127.0.0.1:$HTTP_PORT"
  wait "$LOAD_PID" || true
fi

runs python && say "(d) Python: confluent-kafka + orjson + pyarrow + redis-py + torch" &&
measure python "$TOPIC" "$EVENTS" python3 benches/python_pipeline.py --topic "$TOPIC" \
  --group "bench-$RUN_ID-python" --dead-letters "$ORDERS_DLQ" --predictions "$FRAUD_TOPIC" \
  --feedback "$FRAUD_FEEDBACK_TOPIC" --output "$WORK/out-python"

if [ "$FACTOR" -gt 0 ] && runs full; then
  BIG=$((EVENTS * FACTOR))
  BIG_TOPIC="bench-$RUN_ID-x$FACTOR"
  preload "$BIG_TOPIC" "$BIG"
  say "(a) again on a backlog of $BIG events: peak RSS"
  sluice "full-x$FACTOR" "$BIG_TOPIC" "$BIG" pipelines/orders.toml
fi

if [ "${BENCH_EXTRA:-0}" = 1 ]; then
  say "The scoring stage alone: sluice against PyTorch in Python, same model and batch size"
  "$BIN/sluice-bench" score pipelines/orders.toml --rows 200000 >"$WORK/score-sluice.json"
  python3 models/fraud.py bench models/fraud/1/model.pt --rows 200000 --batch 256 \
    >"$WORK/score-python.json"
  say "The scoring stage again, with a trainer fine-tuning the model beside it (its own process)"
  "$BIN/sluice-bench" train-load pipelines/fraud_train.toml --pipeline pipelines/orders.toml \
    --seconds 600 --stop-file "$WORK/scored" >"$WORK/train-load.json" &
  TRAIN_PID=$!
  sleep 3
  "$BIN/sluice-bench" score pipelines/orders.toml --rows 200000 >"$WORK/score-sluice-training.json"
  touch "$WORK/scored"
  wait "$TRAIN_PID"
fi

# Prediction latency on the stream: sluice runs (and is ready) first, then events are produced
# live at half the rate of (a) (or BENCH_RATE) for BENCH_LIVE_SECONDS (default 20).
if runs latency || [ "${BENCH_EXTRA:-0}" = 1 ]; then
  RATE_WHY="half the rate of (a)"
  if [ -n "${BENCH_RATE:-}" ]; then
    RATE="$BENCH_RATE"
    RATE_WHY="BENCH_RATE"
  elif [ -f "$WORK/full.seconds" ]; then
    RATE=$(python3 -c "print(round($EVENTS / float(open('$WORK/full.seconds').read()) / 2))")
  else
    echo "the latency run needs the full run's rate, or BENCH_RATE" >&2
    exit 2
  fi
  SECONDS_LIVE="${BENCH_LIVE_SECONDS:-20}"
  say "Prediction latency at $RATE events/s ($RATE_WHY), events produced live for ${SECONDS_LIVE}s"
  LIVE_TOPIC="bench-$RUN_ID-live"
  "$BIN/sluice-bench" create-topic "$LIVE_TOPIC" --partitions 4
  METRICS_PORT=$(free_port)
  redis-cli -u "$REDIS_URL" FLUSHALL >/dev/null
  case "${BENCH_LIVE_PIPELINE:-full}" in
    full) LIVE_PIPELINE=pipelines/orders.toml ;;
    noagg) LIVE_PIPELINE="$WORK/no-aggregates.toml"; RATE_WHY="$RATE_WHY, without the aggregate views" ;;
    *) echo "BENCH_LIVE_PIPELINE is full or noagg" >&2; exit 2 ;;
  esac
  ORDERS_TOPIC="$LIVE_TOPIC" ORDERS_GROUP="bench-$RUN_ID-live" ORDERS_OUTPUT="$WORK/out-live" \
    "$BIN/sluice" run "$LIVE_PIPELINE" --listen "127.0.0.1:$METRICS_PORT" \
    >"$WORK/live.out" 2>"$WORK/live.log" &
  SLUICE_PID=$!
  for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$METRICS_PORT/readyz")" = 200 ] && break
    sleep 0.1
  done
  python3 benches/redis_usage.py "$REDIS_URL" cpu >"$WORK/live.redis-cpu-before"
  "$BIN/sluice-bench" generate "$LIVE_TOPIC" --count $((RATE * SECONDS_LIVE)) --rate "$RATE" \
    >"$WORK/live.json" &
  GEN_PID=$!
  # The histogram after a warm-up (the events are made first, about a second, then sent),
  # so that the report also shows the steady state apart from the first seconds.
  sleep $((${BENCH_LIVE_WARMUP:-5} + 2))
  curl -s "127.0.0.1:$METRICS_PORT/metrics" >"$WORK/live-warm.metrics"
  date +%s.%N >"$WORK/live-warm.time"
  wait "$GEN_PID"
  "$BIN/sluice-bench" wait-committed "$LIVE_TOPIC" --group "bench-$RUN_ID-live" \
    --total $((RATE * SECONDS_LIVE)) --timeout-secs 600 --while-running "$SLUICE_PID"
  curl -s "127.0.0.1:$METRICS_PORT/metrics" >"$WORK/live.metrics"
  date +%s.%N >"$WORK/live.time"
  python3 benches/redis_usage.py "$REDIS_URL" cpu >"$WORK/live.redis-cpu-after"
  # sluice's CPU time so far (user + system), for its CPU per event at this rate.
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$SLUICE_PID/stat" >"$WORK/live.cpu"
  kill -TERM "$SLUICE_PID" 2>/dev/null || true
  wait "$SLUICE_PID" || true
  SLUICE_PID=""
  METRICS_PORT=""
  echo "$RATE" >"$WORK/live.rate"
  echo $((RATE * SECONDS_LIVE)) >"$WORK/live.events"
  echo "$RATE_WHY" >"$WORK/live.why"
fi

# The inference API alone against the Python server a team would write instead (FastAPI +
# uvicorn + TorchScript, one worker per core), same model file and load generator: 1, 8 and
# 64 closed-loop clients, one row per request.
if runs serve; then
  SERVE_SECONDS="${BENCH_SERVE_SECONDS:-10}"
  say "The inference API: sluice against FastAPI + uvicorn + TorchScript (${SERVE_SECONDS}s per level)"
  "$BIN/sluice-bench" create-topic "bench-$RUN_ID-idle" --partitions 1
  HTTP_PORT=$(free_port)
  ORDERS_TOPIC="bench-$RUN_ID-idle" ORDERS_GROUP="bench-$RUN_ID-serve" ORDERS_OUTPUT="$WORK/out-serve" \
    "$BIN/sluice" run pipelines/orders.toml --listen off --inference-http "127.0.0.1:$HTTP_PORT" \
    >"$WORK/serve.log" 2>&1 &
  SLUICE_PID=$!
  SERVERS="sluice:$HTTP_PORT"
  for server in sluice fastapi; do
    if [ "$server" = fastapi ]; then
      kill -TERM "$SLUICE_PID" 2>/dev/null || true
      wait "$SLUICE_PID" || true
      HTTP_PORT=$(free_port)
      MODEL_PATH=models/fraud/1/model.pt python3 -m uvicorn benches.fastapi_server:app \
        --workers "$(nproc)" --port "$HTTP_PORT" --log-level warning >"$WORK/fastapi.log" 2>&1 &
      SLUICE_PID=$!
    fi
    for _ in $(seq 600); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$HTTP_PORT/v2/health/ready")" = 200 ] && break
      sleep 0.1
    done
    for c in 1 8 64; do
      "$BIN/sluice-bench" load "http://127.0.0.1:$HTTP_PORT" --concurrency "$c" \
        --seconds "$SERVE_SECONDS" >"$WORK/serve-$server-$c.json"
    done
  done
  kill -TERM "$SLUICE_PID" 2>/dev/null || true
  wait "$SLUICE_PID" || true
  SLUICE_PID=""
fi

python3 benches/report.py "$WORK" "$EVENTS" "$FACTOR"
