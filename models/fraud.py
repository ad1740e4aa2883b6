"""The demo's fraud model: synthetic training data shaped like `sluice-bench generate` events,
the feature encoding that `pipelines/orders.toml` declares, training, and TorchScript export.

    python3 models/fraud.py train [--out models/fraud] [--version 1] [--seed 7]
    python3 models/fraud.py bench MODEL.pt [--rows 200000] [--batch 256]
    python3 models/fraud.py compare EXAMPLES.jsonl

`compare` trains the model twice on examples exactly as sluice fed them (`sluice-bench
examples`: feedback records joined with the demo world's truth), once with the velocity
aggregates from Redis and once with them zeroed, on the older 75%, and prints the held-out AUC
and log loss of each on the newer 25%.

`train` writes OUT/VERSION/model.pt (a Triton-style model repository that sluice watches) and
prints the held-out accuracy. `bench` scores events the way a Python service would (dicts ->
features -> tensor -> TorchScript forward, in batches, one intra-op thread) and prints rows/s,
with and without the encoding; scripts/bench-scoring.sh runs it beside sluice's stage.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch

# The vocabularies of pipelines/orders.toml ([[model.inputs]] one_hot), in order.
CURRENCIES = ["EUR", "USD", "GBP", "JPY", "BRL"]
COUNTRIES = ["FR", "DE", "US", "GB", "BR", "JP", "ES", "IT"]
CHANNELS = ["web", "ios", "android", "store", "partner"]
# The aggregate inputs of pipelines/orders.toml (view "velocity", read from Redis at the
# event's own event time, the event included).
AGGREGATES = ["velocity.orders_10m", "velocity.orders_1h", "velocity.amount_avg_6h", "velocity.amount_max_1h"]
FEATURES = (
    ["amount"]
    + [f"currency={c}" for c in CURRENCIES]
    + [f"country={c}" for c in COUNTRIES]
    + [f"channel={c}" for c in CHANNELS]
    + ["hour", "new_customer"]
    + AGGREGATES
)
BASE = len(FEATURES) - len(AGGREGATES)


def one_hot(value, vocabulary):
    """Unknown and null values encode as all zeros (sluice's documented policy)."""
    return [1.0 if value == v else 0.0 for v in vocabulary]


def encode(event):
    """One event (a dict as produced to Kafka, with the aggregates sluice reads from Redis
    under their input names) -> the feature vector sluice feeds the model."""
    amount = event.get("amount")
    hour = int(event["created_at"][11:13])
    new = event.get("new_customer")
    return (
        [float(amount) if amount is not None else 0.0]
        + one_hot(event.get("currency"), CURRENCIES)
        + one_hot(event.get("country"), COUNTRIES)
        + one_hot(event.get("channel"), CHANNELS)
        + [float(hour), 1.0 if new else 0.0]
        + [float(event.get(a) or 0.0) for a in AGGREGATES]
    )


def synthetic_event(rng):
    """An event with the distribution of `sluice-bench generate`, and its fraud label."""
    c = rng.randrange(len(COUNTRIES))
    amount = sum(rng.randrange(1, 5) * rng.randrange(100, 20000) / 100 for _ in range(rng.randrange(1, 4)))
    event = {
        "amount": round(amount, 2),
        "currency": CURRENCIES[c % len(CURRENCIES)],
        "country": COUNTRIES[c],
        "channel": rng.choice(CHANNELS),
        "new_customer": rng.random() < 0.1,
        "created_at": f"2026-11-21T{rng.randrange(24):02d}:00:00.000Z",
    }
    # The customer's own history, roughly as `sluice-bench generate` makes it: a spending level
    # per customer, and now and then a burst of large orders on one account within seconds.
    level = rng.uniform(0.3, 3.0)
    burst = rng.random() < 0.06
    usual = 150.0 * level
    relative = event["amount"] * (5.0 if burst else 1.0)
    event["amount"] = round(relative * level, 2)
    recent = 1 + (rng.randrange(1, 8) if burst else int(rng.random() < 0.2))
    history = 1 + rng.randrange(12)
    event["velocity.orders_10m"] = float(recent)
    event["velocity.orders_1h"] = float(recent + rng.randrange(3))
    event["velocity.amount_avg_6h"] = (usual * history + event["amount"] * recent) / (history + recent)
    event["velocity.amount_max_1h"] = max(event["amount"], usual * rng.uniform(1.0, 2.0))
    # The hidden rule the model has to learn: large night-time orders from new customers
    # through partners are riskier.
    hour = int(event["created_at"][11:13])
    logit = (
        -6.5
        + 0.6 * math.log1p(relative)
        + 1.8 * event["new_customer"]
        + 1.2 * (event["channel"] == "partner")
        + 0.9 * (event["country"] == "BR")
        + 1.4 * (hour < 6)
        + 3.0 * burst
    )
    label = rng.random() < 1 / (1 + math.exp(-logit))
    return event, float(label)


class FraudModel(torch.nn.Module):
    """Raw features in (amount in currency units, one-hots, hour 0-23, flag, then the
    aggregates); the scaling is part of the model so that serving needs no preprocessing beyond
    the declared encoding. The amount against the customer's own 6-hour average is a feature
    the model derives itself."""

    def __init__(self, n_features: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features + 1, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amount = torch.log1p(x[:, 0:1])
        angle = x[:, 19:20] * (2.0 * math.pi / 24.0)
        unusual = amount - torch.log1p(x[:, 23:24])
        z = torch.cat(
            [amount / 8.0, x[:, 1:19], torch.sin(angle), torch.cos(angle), x[:, 20:21],
             torch.log1p(x[:, 21:23]), unusual, torch.log1p(x[:, 24:25]) / 8.0],
            dim=1,
        )
        return torch.sigmoid(self.net(z))


def fit(x, y, seed, epochs=6):
    """Adam on mini-batches of 256; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = FraudModel(len(FEATURES))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCELoss()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            idx = perm[i : i + 256]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return model.eval()


def auc(scores, labels):
    """Area under the ROC curve by ranks (ties share their rank)."""
    pairs = sorted(zip(scores, labels))
    ranks, i = [0.0] * len(pairs), 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    pos = sum(1 for _, l in pairs if l > 0.5)
    neg = len(pairs) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    total = sum(r for r, (_, l) in zip(ranks, pairs) if l > 0.5)
    return (total - pos * (pos + 1) / 2) / (pos * neg)


def compare(path, text=False):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    x = torch.tensor([r["features"] for r in rows], dtype=torch.float32)
    y = torch.tensor([[float(r["label"])] for r in rows], dtype=torch.float32)
    split = len(rows) * 3 // 4
    without = x.clone()
    without[:, BASE:] = 0.0
    out = {"examples": len(rows), "train": split, "holdout": len(rows) - split,
           "positives": float(y.mean().item())}
    for name, data in (("with_aggregates", x), ("without_aggregates", without)):
        model = fit(data[:split], y[:split], seed=7, epochs=4)
        with torch.no_grad():
            p = model(data[split:]).clamp(1e-6, 1 - 1e-6)
        loss = torch.nn.functional.binary_cross_entropy(p, y[split:]).item()
        out[name] = {"auc": auc(p[:, 0].tolist(), y[split:, 0].tolist()), "log_loss": loss}
    if not text:
        print(json.dumps(out))
        return
    w, wo = out["with_aggregates"], out["without_aggregates"]
    print(f"held-out AUC of the fraud model trained on {split} examples as fed, tested on the "
          f"next {len(rows) - split}: {w['auc']:.4f} with the aggregates, {wo['auc']:.4f} "
          f"without (log loss {w['log_loss']:.4f} vs {wo['log_loss']:.4f}; "
          f"{out['positives']:.1%} frauds)")


def train(out, version, seed, samples=60000, epochs=6):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    data = [synthetic_event(rng) for _ in range(samples)]
    x = torch.tensor([encode(e) for e, _ in data], dtype=torch.float32)
    y = torch.tensor([[label] for _, label in data], dtype=torch.float32)
    split = samples * 5 // 6
    model = fit(x[:split], y[:split], seed, epochs)
    with torch.no_grad():
        p = model(x[split:])
        accuracy = ((p > 0.5).float() == y[split:]).float().mean().item()
        base = max(y[split:].mean().item(), 1 - y[split:].mean().item())
    path = os.path.join(out, str(version), "model.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scripted = torch.jit.script(model)
    # Written beside, then renamed: sluice never sees a half-written version.
    scripted.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {len(FEATURES)} features, held-out accuracy {accuracy:.3f} "
          f"(majority class {base:.3f}), fraud rate {y.mean().item():.3f}")


def bench(model_path, rows, batch):
    rng = random.Random(7)
    events = [synthetic_event(rng)[0] for _ in range(rows)]
    model = torch.jit.load(model_path)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(batch, len(FEATURES)))  # warm-up, as sluice does
        started = time.perf_counter()
        for i in range(0, rows, batch):
            x = torch.tensor([encode(e) for e in events[i : i + batch]], dtype=torch.float32)
            model(x).tolist()
        with_encoding = time.perf_counter() - started
        tensors = [
            torch.tensor([encode(e) for e in events[i : i + batch]], dtype=torch.float32)
            for i in range(0, rows, batch)
        ]
        started = time.perf_counter()
        for x in tensors:
            model(x).tolist()
        forward_only = time.perf_counter() - started
    print(json.dumps({"rows": rows, "batch": batch, "torch": torch.__version__,
                      "rows_per_second": rows / with_encoding,
                      "forward_only_rows_per_second": rows / forward_only}))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and export a version")
    t.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fraud"))
    t.add_argument("--version", type=int, default=1)
    t.add_argument("--seed", type=int, default=7)
    b = sub.add_parser("bench", help="score events as a Python service would, and time it")
    b.add_argument("model")
    b.add_argument("--rows", type=int, default=200000)
    b.add_argument("--batch", type=int, default=256)
    c = sub.add_parser("compare", help="held-out AUC with and without the aggregates")
    c.add_argument("examples")
    c.add_argument("--text", action="store_true", help="one sentence instead of JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "train":
        train(args.out, args.version, args.seed)
    elif args.command == "compare":
        compare(args.examples, args.text)
    else:
        bench(args.model, args.rows, args.batch)


if __name__ == "__main__":
    main(sys.argv[1:])
