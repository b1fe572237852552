"""A cheap model: scikit-learn logistic regression, 784 float32 -> class id (int64).

Trained at load on synthetic data (``make_classification``, 10 classes, fixed
seed), so every replica holds the same model and nothing is downloaded. One
``predict`` costs about 0.2 ms whatever the batch size up to a few hundred
rows (scikit-learn's per-call validation dominates the 784 x 10 product):
the model that batching is for.
"""

import numpy as np


class LogReg:
    n_features = 784
    n_classes = 10

    def load(self) -> None:
        from sklearn.datasets import make_classification
        from sklearn.linear_model import LogisticRegression

        x, y = make_classification(n_samples=2000, n_features=self.n_features, n_informative=64,
                                   n_redundant=0, n_classes=self.n_classes, random_state=0)
        self.model = LogisticRegression(max_iter=300).fit(x.astype(np.float32), y)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.model.predict(batch.reshape(len(batch), -1)).astype(np.int64)
