"""TorchScript models for the scoring tests, and the PyTorch reference they are checked against.

    python3 models.py linear OUT.pt --seed N      a small MLP: 4 features -> one score
    python3 models.py faulty OUT.pt               raises, returns NaN or the wrong shape on cue
    python3 models.py broken OUT.pt               passes a warm-up of zeros, raises on real rows
    python3 models.py slow OUT.pt                 a score that takes ~0.5 s per batch of 64 rows
    python3 models.py any-width OUT.pt            0.5 for every row, of any number of features
    python3 models.py reference MODEL.pt EVENTS   one line per event: {"id":..,"score":..}
    python3 models.py train-reference BASE.pt CANDIDATE.pt EXAMPLES --optimizer adam|sgd
        --lr LR [--momentum M] --batch B --epochs E --holdout H
                                                  PyTorch's own round on the examples (one
                                                  JSON example per line, as the label join
                                                  writes them), compared with the candidate

The features are those of the test pipelines ([[model.inputs]]): amount, currency one-hot over
["EUR", "USD"] (unknown and null: zeros), hour of `at` (UTC). They are computed here from the
JSON events, independently of sluice.
"""

import json
import sys

import torch

torch.set_num_threads(1)


def features(event):
    currency = event.get("currency")
    hour = int(event["at"][11:13])
    return [float(event["amount"]), float(currency == "EUR"), float(currency == "USD"), float(hour)]


class Linear(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x[:, 0:1] / 500.0, x[:, 1:3], x[:, 3:4] / 24.0], dim=1)
        return torch.sigmoid(self.b(torch.tanh(self.a(z))))


class Faulty(torch.nn.Module):
    """amount 13.5 raises for the whole batch; 17.5 gives NaN for its row; 19.5 makes the
    batch's output one row short."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amount = x[:, 0]
        if bool((amount == 13.5).any()):
            raise RuntimeError("amount 13.5 is not allowed")
        out = torch.sigmoid(amount / 100.0).unsqueeze(1)
        out = torch.where((amount == 17.5).unsqueeze(1), torch.full_like(out, float("nan")), out)
        if bool((amount == 19.5).any()):
            out = out[1:]
        return out


class Broken(torch.nn.Module):
    """Finite on zeros (a warm-up passes), raises on any batch with a non-zero amount."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] != 0.0).any()):
            raise RuntimeError("this version only works on zeros")
        return torch.zeros(x.shape[0], 1)


class Slow(torch.nn.Module):
    """sigmoid(amount / 100), after a few hundred needless matrix products per batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(256, 256) / 16.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ones(x.shape[0], 256)
        for _ in range(8000):
            y = torch.tanh(y @ self.w)
        return torch.sigmoid(x[:, 0:1] / 100.0 + 0.0 * y[:, 0:1])


class AnyWidth(torch.nn.Module):
    """0.5 for every row, whatever the feature vector's width (the enrichment tests read the
    features back from the feedback records)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(0.0 * x.sum(dim=1, keepdim=True))


class Weighted(torch.nn.Module):
    """sigmoid of a weighted sum of every feature, whatever the width: a score that changes
    with each input (the inference API's tests compare a request's score with the stream's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.arange(1, x.shape[1] + 1, dtype=torch.float32) / 1000.0
        return torch.sigmoid((x * w).sum(dim=1, keepdim=True) - 1.0)


def save(module, path):
    scripted = torch.jit.script(module)
    scripted.save(path + ".tmp")
    import os

    os.replace(path + ".tmp", path)


def train_reference(base, candidate, examples_file, opts):
    """Fine-tunes BASE as sluice's trainer documents it (examples one per event id, sorted by
    scored_at then event_id, the newest `holdout` share left out, mini-batches in order,
    BCE of the clamped score, the given optimizer) and compares the weights with CANDIDATE."""
    import math

    seen, examples = set(), []
    for line in open(examples_file):
        if line.strip():
            e = json.loads(line)
            if e["event_id"] not in seen:
                seen.add(e["event_id"])
                examples.append(e)
    examples.sort(key=lambda e: (e["scored_at"], e["event_id"]))
    training = examples[: len(examples) - math.ceil(len(examples) * float(opts["holdout"]))]
    model = torch.jit.load(base)
    model.train()
    params = list(model.parameters())
    lr = float(opts["lr"])
    if opts["optimizer"] == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=float(opts.get("momentum", 0.0)))
    batch = int(opts["batch"])
    for _ in range(int(opts["epochs"])):
        for i in range(0, len(training), batch):
            chunk = training[i : i + batch]
            x = torch.tensor([e["features"] for e in chunk], dtype=torch.float32)
            y = torch.tensor([e["label"] for e in chunk], dtype=torch.float32)
            out = model(x).reshape(-1)
            loss = torch.nn.functional.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    theirs = dict(torch.jit.load(candidate).named_parameters())
    first = dict(torch.jit.load(base).named_parameters())
    diff = max((p.detach() - theirs[n].detach()).abs().max().item() for n, p in model.named_parameters())
    moved = max((first[n].detach() - theirs[n].detach()).abs().max().item() for n in first)
    print(json.dumps({"max_abs_diff": diff, "moved": moved, "trained_on": len(training),
                      "candidate_training_flag": torch.jit.load(candidate).training}))


def main(argv):
    command = argv[0]
    if command == "linear":
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 1
        save(Linear(seed).eval(), argv[1])
    elif command == "faulty":
        save(Faulty().eval(), argv[1])
    elif command == "broken":
        save(Broken().eval(), argv[1])
    elif command == "slow":
        save(Slow().eval(), argv[1])
    elif command == "any-width":
        save(AnyWidth().eval(), argv[1])
    elif command == "weighted":
        save(Weighted().eval(), argv[1])
    elif command == "reference":
        model = torch.jit.load(argv[1])
        model.eval()
        events = [json.loads(line) for line in open(argv[2]) if line.strip()]
        with torch.no_grad():
            for i in range(0, len(events), 256):
                chunk = events[i : i + 256]
                x = torch.tensor([features(e) for e in chunk], dtype=torch.float32)
                y = model(x).reshape(-1)
                for e, v in zip(chunk, y.tolist()):
                    print(json.dumps({"id": e["id"], "score": v, "features": features(e)}))
    elif command == "train-reference":
        opts = {argv[i][2:]: argv[i + 1] for i in range(4, len(argv), 2)}
        train_reference(argv[1], argv[2], argv[3], opts)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
