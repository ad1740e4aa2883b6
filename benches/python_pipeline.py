"""The baseline of scripts/bench.sh: the job of pipelines/orders.toml written the way most teams
write it in Python, with confluent-kafka, orjson, pyarrow, redis-py and torch.

    python3 benches/python_pipeline.py --topic T --group G --dead-letters T.dlq \
        --predictions T.fraud --feedback T.fraud.feedback --output DIR \
        [--bootstrap 127.0.0.1:9092] [--redis redis://127.0.0.1:6379] \
        [--schema schemas/orders.json] [--model models/fraud/1/model.pt]

Per micro-batch (up to 10,000 messages or 500 ms, as in orders.toml):
- orjson parses each payload and a validator compiled from the JSON Schema checks it; an event
  that fails goes to the dead-letter topic with its original bytes and the reason in headers;
- the newest event per customer is written to Redis in one pipeline (HSET + EXPIRE of the hash
  `cust:{customer_id}`, with the same fields and value encoding as sluice's view);
- the fraud model (TorchScript, one intra-op thread) scores the batch in one forward pass, with
  the feature encoding of models/fraud.py; a prediction and a feedback record per event go to
  their topics with the same JSON shape as sluice's;
- valid rows wait in memory until 100,000 have accumulated (orders.toml's row group) or the topic
  is idle, then pyarrow writes them as zstd Parquet under dt=/hour= folders; the producer is
  flushed and the consumer's offsets committed, so a crash loses nothing.

What it does not do, as most such scripts do not: compare event times in Redis (a replay can
roll a feature back), deduplicate Parquet after a crash (files written before a crash are
written again), retry failed writes, or handle rebalances beyond librdkafka's defaults.
"""

import argparse
import datetime
import os
import sys
import time
import uuid

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import redis
import torch
from confluent_kafka import Consumer, Producer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from fraud import encode  # noqa: E402  (the encoding the model was trained with)

BATCH = 10_000
FILE_ROWS = 100_000
VIEW_FIELDS = {  # column -> hash field, as [[sink.redis.views]] "customer" in orders.toml
    "event_type": "last_event_type", "amount": "last_amount", "currency": "currency",
    "country": "country", "channel": "channel", "new_customer": "new_customer",
    "created_at": "last_event_at",
}
TTL_SECONDS = 30 * 24 * 3600
PASS_THROUGH = ["customer_id", "order_id", "amount", "currency"]


class Invalid(Exception):
    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


def parse_time(s):
    return datetime.datetime.fromisoformat(s).astimezone(datetime.timezone.utc)


def compile_schema(node, path="$"):
    """A checker for one JSON Schema node (the subset schemas/ uses) -> fn(value)."""
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    nullable = "null" in types
    kind = next((t for t in types if t != "null"), None)
    enum, fmt = node.get("enum"), node.get("format")
    lo, hi = node.get("minimum"), node.get("maximum")
    min_len, max_len = node.get("minLength"), node.get("maxLength")
    pytypes = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
               "object": dict, "array": list}.get(kind)
    if kind == "object":
        props = {k: compile_schema(v, f"{path}.{k}") for k, v in node.get("properties", {}).items()}
        # Required and not nullable: absent or null is a missing field.
        required = [k for k in node.get("required", []) if "null" not in node["properties"].get(k, {}).get("type", [])]
    elif kind == "array":
        item = compile_schema(node.get("items", {}), f"{path}[]")

    def check(v):
        if v is None:
            if nullable:
                return
            raise Invalid("wrong_type", f"{path}: null")
        if pytypes and (not isinstance(v, pytypes) or (kind in ("integer", "number") and isinstance(v, bool))):
            raise Invalid("wrong_type", f"{path}: expected {kind}")
        if enum is not None and v not in enum:
            raise Invalid("not_in_enum", f"{path}: {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise Invalid("out_of_range", f"{path}: {v}")
        if (min_len is not None and len(v) < min_len) or (max_len is not None and len(v) > max_len):
            raise Invalid("out_of_range", f"{path}: length {len(v)}")
        if fmt == "date-time" or fmt == "date":
            try:
                parse_time(v) if fmt == "date-time" else datetime.date.fromisoformat(v)
            except ValueError:
                raise Invalid("bad_timestamp", f"{path}: {v!r}") from None
        if kind == "object":
            for k in required:
                if v.get(k) is None:
                    raise Invalid("missing_field", f"{path}.{k}")
            for k, c in props.items():
                if k in v:
                    c(v[k])
        elif kind == "array":
            for x in v:
                item(x)

    return check


def arrow_type(node):
    types = node.get("type", [])
    kind = next((t for t in ([types] if isinstance(types, str) else types) if t != "null"), None)
    if kind == "object":
        return pa.struct([(k, arrow_type(v)) for k, v in node.get("properties", {}).items()])
    if kind == "array":
        return pa.list_(arrow_type(node.get("items", {})))
    if node.get("format") == "date-time":
        return pa.timestamp("us", tz="UTC")
    if node.get("format") == "date":
        return pa.date32()
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}[kind]


def redis_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime.datetime):
        return v.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return v


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    p.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--schema", default=os.path.join(root, "schemas", "orders.json"))
    p.add_argument("--model", default=os.path.join(root, "models", "fraud", "1", "model.pt"))
    for name in ("topic", "group", "dead-letters", "predictions", "feedback", "output"):
        p.add_argument(f"--{name}", required=True)
    args = p.parse_args(argv)

    schema = orjson.loads(open(args.schema, "rb").read())
    validate = compile_schema(schema)
    fields = list(schema["properties"])
    times = [k for k, v in schema["properties"].items() if v.get("format") == "date-time"]
    dates = [k for k, v in schema["properties"].items() if v.get("format") == "date"]
    arrow_schema = pa.schema(
        [(k, arrow_type(v)) for k, v in schema["properties"].items()]
        + [("_topic", pa.string()), ("_partition", pa.int32()), ("_offset", pa.int64()),
           ("_timestamp", pa.timestamp("ms", tz="UTC")), ("dt", pa.string()), ("hour", pa.string())])

    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": args.bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5, "compression.type": "lz4"})
    store = redis.Redis.from_url(args.redis)
    torch.set_num_threads(1)
    model = torch.jit.load(args.model)
    model.eval()
    version = os.path.basename(os.path.dirname(args.model))
    consumer.subscribe([args.topic])

    def produce(topic, key, value, headers):
        while True:
            try:
                producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                producer.poll(0.05)

    rows = []
    while True:
        messages = consumer.consume(BATCH, timeout=0.5)
        if not messages:
            if rows:
                write_parquet(rows, arrow_schema, args.output)
                rows = []
                producer.flush()
                consumer.commit(asynchronous=False)
            continue
        good = []
        for m in messages:
            if m.error():
                continue
            try:
                try:
                    event = orjson.loads(m.value() or b"")
                except orjson.JSONDecodeError as e:
                    raise Invalid("invalid_json", str(e)) from None
                if not isinstance(event, dict):
                    raise Invalid("not_object", type(event).__name__)
                validate(event)
            except Invalid as e:
                produce(args.dead_letters, m.key(), m.value(), [
                    ("sluice.topic", m.topic()), ("sluice.partition", str(m.partition())),
                    ("sluice.offset", str(m.offset())), ("sluice.stage", "decode"),
                    ("sluice.reason", e.reason), ("sluice.error", str(e))])
                continue
            row = {k: event.get(k) for k in fields}
            for k in times:
                if row[k] is not None:
                    row[k] = parse_time(row[k])
            for k in dates:
                if row[k] is not None:
                    row[k] = datetime.date.fromisoformat(row[k])
            at = row["created_at"]
            row.update(_topic=m.topic(), _partition=m.partition(), _offset=m.offset(),
                       _timestamp=m.timestamp()[1], dt=at.strftime("%Y-%m-%d"), hour=f"{at.hour:02d}")
            good.append((row, event))
        if not good:
            continue

        # Features: the newest event per customer, in one pipeline.
        newest = {row["customer_id"]: row for row, _ in good}
        pipe = store.pipeline(transaction=False)
        for customer, row in newest.items():
            key = f"cust:{customer}"
            values = {VIEW_FIELDS[c]: redis_value(row[c]) for c in VIEW_FIELDS if row[c] is not None}
            values.update(_ts=int(row["created_at"].timestamp() * 1_000_000),
                          _partition=row["_partition"], _offset=row["_offset"])
            pipe.hset(key, mapping=values)
            nulls = [VIEW_FIELDS[c] for c in VIEW_FIELDS if row[c] is None]
            if nulls:
                pipe.hdel(key, *nulls)
            pipe.expire(key, TTL_SECONDS)
        pipe.execute()

        # Scores: one forward pass per micro-batch.
        features = [encode(event) for _, event in good]
        with torch.no_grad():
            scores = model(torch.tensor(features, dtype=torch.float32)).flatten().tolist()
        for (row, _), x, y in zip(good, features, scores):
            source = {"topic": row["_topic"], "partition": row["_partition"], "offset": row["_offset"]}
            key = row["customer_id"].encode()
            headers = [("sluice.topic", row["_topic"]), ("sluice.partition", str(row["_partition"])),
                       ("sluice.offset", str(row["_offset"])), ("sluice.model", "fraud"),
                       ("sluice.model_version", version)]
            produce(args.predictions, key, orjson.dumps({
                "event_id": row["event_id"], "model": "fraud", "model_version": version,
                "outputs": {"fraud_score": y}, "columns": {c: row[c] for c in PASS_THROUGH},
                "source": source}), headers)
            produce(args.feedback, key, orjson.dumps({
                "event_id": row["event_id"], "model": "fraud", "model_version": version,
                "features": x, "outputs": [y], "source": source}), headers)
        producer.poll(0)

        rows.extend(row for row, _ in good)
        if len(rows) >= FILE_ROWS:
            write_parquet(rows, arrow_schema, args.output)
            rows = []
            producer.flush()
            consumer.commit(asynchronous=False)


def write_parquet(rows, schema, output):
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_to_dataset(table, output, partition_cols=["dt", "hour"], compression="zstd",
                        basename_template=f"part-{uuid.uuid4().hex}-{{i}}.parquet")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass
