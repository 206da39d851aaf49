"""Trains a digit classifier on the order's dataset with numpy alone, then saves it.

Softmax regression on the 8x8 handwritten digits in /data/digits (the UCI optical digits that
scikit-learn ships): 80% to train, 20% held out to measure accuracy.
"""
import time

import numpy as np

started = time.time()
data = np.loadtxt("/data/digits/digits.csv", delimiter=",")
x, y = data[:, :64] / 16.0, data[:, 64].astype(int)
rng = np.random.default_rng(7)
order = rng.permutation(len(y))
cut = int(0.8 * len(y))
train, test = order[:cut], order[cut:]
print(f"dataset: {len(y)} images of 8x8 pixels; training on {len(train)}, testing on {len(test)}")

w = np.zeros((64, 10))
b = np.zeros(10)
onehot = np.eye(10)[y[train]]
for epoch in range(1, 401):
    z = x[train] @ w + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    grad = (p - onehot) / len(train)
    w -= 0.8 * (x[train].T @ grad + 1e-4 * w)
    b -= 0.8 * grad.sum(axis=0)
    if epoch % 100 == 0:
        loss = -np.log(p[np.arange(len(train)), y[train]] + 1e-12).mean()
        acc = (np.argmax(x[train] @ w + b, axis=1) == y[train]).mean()
        print(f"epoch {epoch:3d}: loss {loss:.3f}, train accuracy {acc:.1%}")

accuracy = (np.argmax(x[test] @ w + b, axis=1) == y[test]).mean()
np.savez("model.npz", w=w, b=b)
print(f"held-out accuracy: {accuracy:.1%} ({time.time() - started:.1f}s); model saved to ~/model.npz")
