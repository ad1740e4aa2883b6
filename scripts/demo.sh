#!/usr/bin/env bash
# The demo: starts a local Kafka-protocol broker (tansu) and redis-server on free ports,
# produces realistic commerce events (a few percent broken in different ways), runs the example
# pipeline (pipelines/orders.toml: Parquet, dead letters, features in Redis, fraud scores from
# the TorchScript model in models/fraud) until the topic is drained, with the inference API
# beside it (one synchronous prediction is asked for and printed), prints a summary and stops
# everything.
#
#   DEMO_EVENTS   how many events to produce (default 200000)
#   KAFKA_BOOTSTRAP  use this broker instead of starting one
#   REDIS_URL        use this Redis instead of starting one
# (scripts/setup.sh lists the rest.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

EVENTS="${DEMO_EVENTS:-200000}"
OUTPUT="$PWD/data/orders"
start_demo sluice-demo
RUN_ID="$(date +%s)"
export ORDERS_TOPIC="orders-$RUN_ID" ORDERS_DLQ="orders-$RUN_ID.dlq" ORDERS_GROUP="sluice-demo-$RUN_ID"
export ORDERS_OUTPUT="$OUTPUT" ORDERS_IDLE_FLUSH="2s"
export FRAUD_TOPIC="orders-$RUN_ID.fraud" FRAUD_FEEDBACK_TOPIC="orders-$RUN_ID.fraud.feedback"
rm -rf "$OUTPUT"
"$BIN/sluice-bench" create-topic "$ORDERS_TOPIC" --partitions 4
"$BIN/sluice-bench" create-topic "$ORDERS_DLQ" --partitions 1
"$BIN/sluice-bench" create-topic "$FRAUD_TOPIC" --partitions 4
"$BIN/sluice-bench" create-topic "$FRAUD_FEEDBACK_TOPIC" --partitions 4

if [ ! -f models/fraud/1/model.pt ]; then
  say "Training the fraud model (models/fraud.py)"
  python3 models/fraud.py train
fi

say "Producing $EVENTS events to $ORDERS_TOPIC on $KAFKA_BOOTSTRAP"
"$BIN/sluice-bench" generate "$ORDERS_TOPIC" --count "$EVENTS"

say "Running pipelines/orders.toml until the topic is drained (the inference API beside it)"
API_PORT=$(free_port)
START=$(date +%s.%N)
"$BIN/sluice" run pipelines/orders.toml --listen off --log-format text \
  --inference-http "127.0.0.1:$API_PORT" 2>"$WORK/sluice.log" &
SLUICE_PID=$!
"$BIN/sluice-bench" wait-committed "$ORDERS_TOPIC" --group "$ORDERS_GROUP" --total "$EVENTS" --timeout-secs 900
END=$(date +%s.%N)

# A synchronous prediction: a new order of customer c-000000, a minute after its newest event,
# scored now by its fields with the same encoding and Redis features as the stream's.
NEWEST=$(redis-cli -u "$REDIS_URL" HGET vel:c-000000 _wm)
AT=$(python3 -c 'import datetime, sys; print(datetime.datetime.fromtimestamp(int(sys.argv[1]) / 1000 + 60, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))' "$NEWEST")
REQUEST='{"inputs": [
  {"name": "event_id", "datatype": "BYTES", "shape": [1], "data": ["e-sync-1"]},
  {"name": "event_type", "datatype": "BYTES", "shape": [1], "data": ["order_placed"]},
  {"name": "customer_id", "datatype": "BYTES", "shape": [1], "data": ["c-000000"]},
  {"name": "amount", "datatype": "FP64", "shape": [1], "data": [1899.0]},
  {"name": "currency", "datatype": "BYTES", "shape": [1], "data": ["EUR"]},
  {"name": "country", "datatype": "BYTES", "shape": [1], "data": ["FR"]},
  {"name": "channel", "datatype": "BYTES", "shape": [1], "data": ["web"]},
  {"name": "new_customer", "datatype": "BOOL", "shape": [1], "data": [false]},
  {"name": "created_at", "datatype": "BYTES", "shape": [1], "data": ["'"$AT"'"]}
]}'
say "A synchronous prediction: POST http://127.0.0.1:$API_PORT/v2/models/fraud/infer"
echo "$REQUEST" | python3 -c 'import json, sys; d = json.load(sys.stdin); print("  the order:", {i["name"]: i["data"][0] for i in d["inputs"]})'
SYNC_STARTED=$(date +%s.%N)
ANSWER=$(curl -s --fail-with-body -X POST -H 'content-type: application/json' -d "$REQUEST" \
  "http://127.0.0.1:$API_PORT/v2/models/fraud/infer")
echo "  the answer ($(python3 -c "print(f'{($(date +%s.%N) - $SYNC_STARTED) * 1000:.1f} ms with curl')")): $ANSWER"
kill -TERM "$SLUICE_PID"
wait "$SLUICE_PID"
SLUICE_PID=""

say "Summary"
"$BIN/sluice-bench" summary --output "$OUTPUT" --topic "$ORDERS_TOPIC" \
  --dead-letter-topic "$ORDERS_DLQ" --group "$ORDERS_GROUP" \
  --elapsed "$(python3 -c "print($END - $START)")"
ENTITIES=$(redis-cli -u "$REDIS_URL" --scan --pattern 'cust:*' | wc -l)
echo "entities in Redis:     $ENTITIES customer hashes (view \"customer\", key cust:<customer_id>)"
EXAMPLE=$(redis-cli -u "$REDIS_URL" --scan --pattern 'cust:*' | sort | head -1 || true)
if [ -n "$EXAMPLE" ]; then
  echo "one of them, as \`$BIN/sluice features get pipelines/orders.toml $EXAMPLE\` shows it:"
  "$BIN/sluice" features get pipelines/orders.toml "$EXAMPLE"
fi
# Windowed aggregates (view "velocity"): one customer's, as of its newest event (the demo's
# events are from 2026-11-18, so windows ending now would be empty).
EXAMPLE=$(redis-cli -u "$REDIS_URL" --scan --pattern 'vel:*' | sort | head -1 || true)
if [ -n "$EXAMPLE" ]; then
  AT=$(python3 -c 'import datetime, sys; print(datetime.datetime.fromtimestamp(int(sys.argv[1]) / 1000, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))' \
    "$(redis-cli -u "$REDIS_URL" HGET "$EXAMPLE" _wm)")
  echo "its aggregates, as \`$BIN/sluice features get pipelines/orders.toml $EXAMPLE --at $AT\` shows them:"
  "$BIN/sluice" features get pipelines/orders.toml "$EXAMPLE" --at "$AT"
fi
echo "fraud scores (model \"fraud\", models/fraud) went to topic $FRAUD_TOPIC, feedback to $FRAUD_FEEDBACK_TOPIC:"
"$BIN/sluice-bench" predictions "$FRAUD_TOPIC" --field fraud_score
# What the aggregates are worth: the model trained twice on the feedback records (the
# features exactly as fed, aggregates included) joined with the demo world's truth, with and
# without the aggregates, on the older 75%; held-out AUC on the newer 25%.
"$BIN/sluice-bench" examples "$FRAUD_FEEDBACK_TOPIC" --count "$EVENTS" --out "$WORK/examples.jsonl" >/dev/null
python3 models/fraud.py compare "$WORK/examples.jsonl" --text

echo "Parquet files are in $OUTPUT; the pipeline's log is $WORK/sluice.log"
