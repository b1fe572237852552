"""Models the end-to-end tests deploy in real container processes."""

import os
import time

import numpy as np


def row_sum(batch):
    """One float64 per input: the sum of its elements."""
    return batch.reshape(len(batch), -1).sum(axis=1).astype(np.float64)


def row_sum_after_sleep(batch):
    """row_sum, after sleeping CLIPPER_TEST_SLEEP_S seconds per batch (a slow replica that holds its batch)."""
    time.sleep(float(os.environ.get("CLIPPER_TEST_SLEEP_S", "0")))
    return row_sum(batch)


def sleep_by_input(batch):
    """Sleep max(x[0]) seconds, then answer x[0] for each input x.

    Writes its pid and the batch to $CLIPPER_TEST_MARK_DIR (if set) when a
    batch starts, so a test can see which container holds it.
    """
    mark = os.environ.get("CLIPPER_TEST_MARK_DIR")
    if mark:
        with open(os.path.join(mark, f"{os.getpid()}.start"), "w") as fh:
            fh.write(",".join(str(float(x[0])) for x in batch))
    time.sleep(float(batch[:, 0].max()))
    return batch[:, 0].astype(np.float64)


def raise_on_negative(batch):
    """Raises for a batch holding an input whose first value is negative."""
    if (batch[:, 0] < 0).any():
        raise ValueError(f"negative pixel {float(batch[:, 0].min())}")
    return batch[:, 0].astype(np.float64)


def wrong_count(batch):
    return np.zeros(len(batch) + 1)


def reverse_bytes(batch):
    """For bytes applications: each input reversed."""
    return [x[::-1] for x in batch]


def shout(batch):
    """For str applications: each input upper-cased, with its type's name."""
    return [f"{x.upper()}:{type(x).__name__}" for x in batch]


def describe(batch):
    """Mixed output kinds: a str, a dict with an array."""
    return [{"n": int(i), "label": f"row-{i}", "vec": np.arange(3, dtype=np.float32)} for i in range(len(batch))]


class Scaled:
    """A class entry with a load step."""

    def load(self):
        self.factor = float(os.environ.get("CLIPPER_TEST_FACTOR", "2"))

    def predict(self, batch):
        return batch.reshape(len(batch), -1)[:, 0] * self.factor


def constant(batch):
    """Every input gets the integer $CLIPPER_TEST_CONST, after sleeping $CLIPPER_TEST_SLEEP_S (default 0),
    and, if $CLIPPER_TEST_GATE names a file, once that file exists (at most 120 s)."""
    delay = float(os.environ.get("CLIPPER_TEST_SLEEP_S", "0"))
    if delay:
        time.sleep(delay)
    gate = os.environ.get("CLIPPER_TEST_GATE")
    if gate:
        deadline = time.monotonic() + 120.0
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
    return np.full(len(batch), int(os.environ.get("CLIPPER_TEST_CONST", "0")), dtype=np.int64)


def first_as_label(batch):
    """Each input's first value as an integer label (right whenever the label is x[0])."""
    return batch.reshape(len(batch), -1)[:, 0].astype(np.int64)


def fixed_probabilities(batch):
    """Every input gets the probability vector $CLIPPER_TEST_PROBS (comma-separated)."""
    p = np.array([float(v) for v in os.environ["CLIPPER_TEST_PROBS"].split(",")], dtype=np.float64)
    return np.tile(p, (len(batch), 1))


_batches_seen = 0


def gated(batch):
    """Answers x[0] for each input x; the test decides when, and how it fails.

    Each batch is recorded first: ``$CLIPPER_TEST_MARK_DIR/<pid>.<n>.batch`` (written whole, by a
    rename) holds the x[0] of its inputs, so a test sees which container holds which inputs. A batch
    whose largest x[1] is k > 0 then waits until the file ``gate-k`` exists in that folder (at most
    120 s): the test holds the batch exactly as long as it needs, with no race against a sleep.
    Then an input with x[0] < 0 makes the whole batch raise, and one with x[2] > 0 (< 0) makes
    predict return one output too many (too few).
    """
    global _batches_seen
    mark = os.environ["CLIPPER_TEST_MARK_DIR"]
    _batches_seen += 1
    path = os.path.join(mark, f"{os.getpid()}.{_batches_seen}.batch")
    with open(path + ".tmp", "w") as fh:
        fh.write(",".join(repr(float(x[0])) for x in batch))
    os.replace(path + ".tmp", path)
    hold = int(batch[:, 1].max())
    if hold > 0:
        gate = os.path.join(mark, f"gate-{hold}")
        deadline = time.monotonic() + 120.0
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
    if (batch[:, 0] < 0).any():
        raise ValueError(f"negative first value {float(batch[:, 0].min())}")
    out = batch[:, 0].astype(np.float64)
    if (batch[:, 2] > 0).any():
        return np.append(out, 0.0)
    if (batch[:, 2] < 0).any():
        return out[:-1]
    return out


def vec_sum(batch):
    """Any batch (an array, or a list of arrays of any length): the sum of each input, a float64."""
    return [float(np.sum(x)) for x in batch]


def as_json_text(batch):
    """Each output a str holding JSON (what the original Clipper's users return): {"n": len, "ok": true}."""
    import json

    return [json.dumps({"n": len(x), "ok": True}) for x in batch]


def varlen_probe(batch):
    """A batch of arrays of any shape: per item, "<batch type> <dtype> <shape> <view|copy> <sum>"; "view" when
    every item of the batch is a view (it owns no data) and they lie back to back in one buffer (the "vl"
    payload, nothing copied per item)."""
    addrs = [x.__array_interface__["data"][0] for x in batch]
    back_to_back = all(addrs[i] + batch[i].nbytes == addrs[i + 1] for i in range(len(batch) - 1))
    return [f"{type(batch).__name__} {x.dtype} {list(x.shape)} "
            f"{'view' if back_to_back and not x.flags.owndata else f'copy({back_to_back},{x.flags.owndata})'} {float(x.sum())}"
            for x in batch]
