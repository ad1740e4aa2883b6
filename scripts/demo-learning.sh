#!/usr/bin/env bash
# The learning-loop demo: the world has changed since the fraud model was trained (fraud moved
# from partners to the iOS app, from Brazil to Germany). sluice scores a first wave of events
# with version 1, the labels arrive later (chargebacks; confirmed deliveries), the label join
# turns feedback + labels into examples, `sluice train` runs a round, gates the candidate on
# the newest examples and publishes it as version 2, and a second wave of events is scored by
# version 2. Prints the versions with their holdout metrics and how the predictions moved.
#
#   DEMO_EVENTS   events per wave (default 60000)
#   KAFKA_BOOTSTRAP, REDIS_URL   use these instead of starting a broker and Redis
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

EVENTS="${DEMO_EVENTS:-60000}"
start_demo sluice-learning
RUN_ID="$(date +%s)"
export ORDERS_TOPIC="orders-$RUN_ID" ORDERS_DLQ="orders-$RUN_ID.dlq" ORDERS_GROUP="sluice-demo-$RUN_ID"
export ORDERS_OUTPUT="$WORK/orders" ORDERS_IDLE_FLUSH="2s"
export FRAUD_TOPIC="orders-$RUN_ID.fraud" FRAUD_FEEDBACK_TOPIC="orders-$RUN_ID.fraud.feedback"
export LABELS_TOPIC="orders-$RUN_ID.fraud.labels" LABELS_DLQ="orders-$RUN_ID.fraud.labels.dlq"
export EXAMPLES_TOPIC="orders-$RUN_ID.fraud.examples" JOIN_GROUP="sluice-join-$RUN_ID"
export TRAINER_GROUP="sluice-trainer-$RUN_ID"
# Minutes to days in production; seconds here.
export JOIN_MATURITY="15s" JOIN_GRACE="5s" FRAUD_RELOAD_INTERVAL="1s"
# The demo trains a copy of the shipped model repository, never models/fraud itself.
if [ ! -f models/fraud/1/model.pt ]; then
  say "Training the fraud model (models/fraud.py)"
  python3 models/fraud.py train
fi
export FRAUD_MODEL_REPOSITORY="$WORK/models/fraud"
mkdir -p "$FRAUD_MODEL_REPOSITORY" && cp -r models/fraud/1 "$FRAUD_MODEL_REPOSITORY/1"
for t in "$ORDERS_TOPIC:4" "$ORDERS_DLQ:1" "$FRAUD_TOPIC:4" "$FRAUD_FEEDBACK_TOPIC:4" \
         "$LABELS_TOPIC:4" "$LABELS_DLQ:1" "$EXAMPLES_TOPIC:1"; do
  "$BIN/sluice-bench" create-topic "${t%:*}" --partitions "${t##*:}"
done

say "Wave 1: $EVENTS events, scored by version 1; feedback joined with labels"
WAVE1=$("$BIN/sluice-bench" generate "$ORDERS_TOPIC" --count "$EVENTS" --seed 42)
VALID=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['by_kind']['valid'])" "$WAVE1")
export TRAIN_ROUND_EXAMPLES="$VALID"
"$BIN/sluice" run pipelines/orders.toml pipelines/fraud_join.toml --listen off 2>"$WORK/sluice.log" &
SLUICE_PID=$!
"$BIN/sluice-bench" wait-committed "$ORDERS_TOPIC" --group "$ORDERS_GROUP" --total "$EVENTS" \
  --timeout-secs 900 --while-running "$SLUICE_PID"
say "The labels arrive (the generator knows the truth): chargebacks, confirmed deliveries"
"$BIN/sluice-bench" labels "$LABELS_TOPIC" --count "$EVENTS" --seed 42

say "Training: one round on the $VALID examples (events without a label mature to 0 after $JOIN_MATURITY)"
"$BIN/sluice" train pipelines/fraud_train.toml --rounds 1 2>"$WORK/train.log" || {
  cat "$WORK/train.log"; exit 1; }
python3 - "$FRAUD_MODEL_REPOSITORY" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/candidates/*/decision.json")):
    d = json.load(open(path))
    t = d["trained"]
    print(f"round {d['round']}: trained on {t['examples']} examples x {t['epochs']} epochs in "
          f"{t['seconds']:.2f} s ({t['examples'] * t['epochs'] / t['seconds']:.0f} examples/s), "
          f"holdout {d['holdout_examples']} (the newest)")
    for who, m in (("serving version " + d["serving_version"], d["serving"]),
                   ("candidate", d["candidate"])):
        print(f"    {who:<20} log loss {m['log_loss']:.4f}  AUC {m['auc']:.4f}  "
              f"calibration error {m['calibration_error']:.4f}  positives {m['positives']}")
    print("    decision: " + (f"published as version {d['published_as']}" if d["passed"]
                              else "refused: " + "; ".join(d["reasons"])))
PY

say "Wave 2: $EVENTS more events, scored by the version in service now"
for _ in $(seq 60); do grep -q "Model version swapped in" "$WORK/sluice.log" && break; sleep 0.5; done
"$BIN/sluice-bench" generate "$ORDERS_TOPIC" --count "$EVENTS" --seed 43 --first "$EVENTS" >/dev/null
"$BIN/sluice-bench" wait-committed "$ORDERS_TOPIC" --group "$ORDERS_GROUP" --total "$((2 * EVENTS))" \
  --timeout-secs 900 --while-running "$SLUICE_PID"
kill -TERM "$SLUICE_PID"
wait "$SLUICE_PID"
SLUICE_PID=""

say "How the predictions moved"
"$BIN/sluice-bench" predictions "$FRAUD_TOPIC" --field fraud_score | head -3
say "The model repository's versions and rollout (sluice model status)"
"$BIN/sluice" model status "$FRAUD_MODEL_REPOSITORY"
echo "logs: $WORK/sluice.log, $WORK/train.log"
