"""Writes digits.npz (scikit-learn's 8x8 digits, shipped inside it: nothing is downloaded)
for the README's `lepton-ctl data put digits.npz ...`."""

import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
np.savez("digits.npz", x=digits.data.astype("float32"), y=digits.target)
print(f"digits.npz: {len(digits.target)} rows, {digits.data.shape[1]} features")
