"""Several different classifiers of scikit-learn's bundled digits (8x8 images, 10 classes).

The selection benchmarks (``bench/selection.py``) deploy one container per
classifier; each trains at load on the same fixed split (nothing is
downloaded). Environment of a container:

``DIGITS_MODEL``
    which classifier: one of :data:`KINDS`.
``DIGITS_TRAIN_N``
    how many training images it learns from (default 300 of the 898 in the
    training half: weaker models disagree more, which is what an ensemble is for).
``CLIPPER_FAULT_FILE``
    while this file exists, the model answers garbage (a uniformly random
    class per input): a model that has broken.
``DIGITS_SLOW_P``, ``DIGITS_SLOW_MS``
    with probability ``DIGITS_SLOW_P`` a batch first sleeps ``DIGITS_SLOW_MS``
    milliseconds: a straggling replica.

Inputs are float32[64] (pixel values 0-16); outputs int64 classes.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np

KINDS = ("logreg", "svm", "knn", "tree", "naive_bayes", "forest", "ridge", "centroid")


def digits_split(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: a fixed half/half split of the digits, float32 inputs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    half = len(y) // 2
    tr, te = order[:half], order[half:]
    return x[tr], y[tr], x[te], y[te]


def make_classifier(kind: str):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    makers = {
        "logreg": lambda: LogisticRegression(max_iter=2000),
        "svm": lambda: SVC(gamma=0.001),
        "knn": lambda: KNeighborsClassifier(n_neighbors=3),
        "tree": lambda: DecisionTreeClassifier(random_state=0),
        "naive_bayes": GaussianNB,
        "forest": lambda: RandomForestClassifier(n_estimators=20, random_state=0),
        "ridge": RidgeClassifier,
        "centroid": NearestCentroid,
    }
    if kind not in makers:
        raise ValueError(f"DIGITS_MODEL {kind!r} is not one of {list(makers)}")
    return makers[kind]()


def train(kind: str, train_n: int = 300):
    x, y, _, _ = digits_split()
    return make_classifier(kind).fit(x[:train_n], y[:train_n])


class DigitsModel:
    """The container entry: ``digits_zoo.py:DigitsModel``."""

    def load(self) -> None:
        self.kind = os.environ.get("DIGITS_MODEL", "logreg")
        self.model = train(self.kind, int(os.environ.get("DIGITS_TRAIN_N", "300")))
        self.fault_file = os.environ.get("CLIPPER_FAULT_FILE") or None
        self.slow_p = float(os.environ.get("DIGITS_SLOW_P", "0"))
        self.slow_s = float(os.environ.get("DIGITS_SLOW_MS", "0")) / 1000
        self.rng = random.Random(os.getpid())
        self.garbage = np.random.default_rng(os.getpid())

    def predict(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.slow_p and self.rng.random() < self.slow_p:
            time.sleep(self.slow_s)
        if self.fault_file and os.path.exists(self.fault_file):
            return self.garbage.integers(0, 10, n, dtype=np.int64)
        return self.model.predict(batch.reshape(n, -1)).astype(np.int64)
