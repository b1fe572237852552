"""An expensive model: a scikit-learn kernel SVM (RBF), 784 float32 -> class id (int64).

Trained at load on noisy synthetic data (``make_classification`` with 30% of
the labels flipped, fixed seed), which leaves about 2,600 support vectors.
Each input is compared with every support vector, so a batch costs about
1.5 ms per row on this machine (plus ~0.3 ms per call): the time grows
linearly with the batch size and batching has little to amortize.
Training takes a few seconds.
"""

import numpy as np


class KernelSVM:
    n_features = 784
    n_samples = 3000

    def load(self) -> None:
        from sklearn.datasets import make_classification
        from sklearn.svm import SVC

        x, y = make_classification(n_samples=self.n_samples, n_features=self.n_features, n_informative=64,
                                   n_redundant=0, flip_y=0.3, random_state=0)
        self.model = SVC(kernel="rbf", gamma="scale", C=1.0, cache_size=500).fit(x, y)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.model.predict(batch.reshape(len(batch), -1)).astype(np.int64)
