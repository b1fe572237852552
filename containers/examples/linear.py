"""A numpy linear model, 784 float32 -> 10 float32 (fixed random weights)."""

import numpy as np


class Linear:
    """Weights are drawn once at load from a fixed seed, so every replica agrees."""

    def load(self) -> None:
        rng = np.random.default_rng(0)
        self.weights = rng.standard_normal((784, 10), dtype=np.float32) / 28.0
        self.bias = rng.standard_normal(10, dtype=np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1) @ self.weights + self.bias
