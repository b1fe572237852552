"""The no-op model: one float32 zero per input. The bench's floor for a model."""

import numpy as np


def predict(batch: np.ndarray) -> np.ndarray:
    return np.zeros(len(batch), dtype=np.float32)
