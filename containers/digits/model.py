"""A real example model: logistic regression on scikit-learn's bundled digits.

The data ships inside scikit-learn (no download). ``load`` trains in well
under a second; ``predict`` returns one digit label (int) per 8x8 image given
as 64 float64 pixel values in 0..16.
"""

import numpy as np


class DigitsClassifier:
    def load(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
        self.model = LogisticRegression(max_iter=2000).fit(X_train / 16.0, y_train)
        self.test_accuracy = float(self.model.score(X_test / 16.0, y_test))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.model.predict(batch / 16.0).astype(np.int64)
