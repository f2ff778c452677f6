"""An independent numpy oracle of docs/method.md's loop, and the softmax-regression model it runs on."""
import numpy as np


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class SoftmaxRegression:
    """p = softmax(W x + b) on size x size images with analytic input gradients: the oracle's model."""

    def __init__(self, seed, size, classes=3, scale=0.6):
        rng = np.random.default_rng(seed)
        self.size = size
        self.W = rng.normal(0, scale, (size * size, classes))
        self.b = rng.normal(0, 0.1, classes)

    def probs(self, x):
        return softmax(x.reshape(len(x), -1) @ self.W + self.b)

    def predict(self, x):
        return self.probs(x).argmax(axis=1)

    def ce_grads(self, x, y):
        """Gradient of each image's cross-entropy at its label y, w.r.t. the image."""
        p = self.probs(x)
        p[np.arange(len(x)), y] -= 1.0
        return (p @ self.W.T).reshape(x.shape)

    def keras(self):
        import keras

        inp = keras.Input((self.size, self.size, 1), name="image")
        out = keras.layers.Dense(len(self.b), activation="softmax")(keras.layers.Flatten()(inp))
        model = keras.Model(inp, out)
        model.layers[-1].set_weights([self.W.astype(np.float32), self.b.astype(np.float32)])
        return model


def oracle_uap(model, X, norm, xi, eps, max_iter, delta, clip, target, rng, step_norm="inf"):
    """The loop, literally, one image at a time: the FGSM step along `step_norm`, the projection onto `norm`'s
    ball, a stop once the crafting rate reaches 1 - delta."""
    clipf = (lambda v: np.clip(v, 0, 1)) if clip else (lambda v: v)
    y0 = model.predict(X)
    rho = np.zeros(X.shape[1:])

    def fooled(pred, i):
        return pred == target if target is not None else pred != y0[i]

    for _ in range(max_iter):
        for i in rng.permutation(len(X)):
            x = X[i]
            if fooled(model.predict(clipf(x + rho)[None])[0], i):
                continue
            g = model.ce_grads(clipf(x + rho)[None], [target if target is not None else y0[i]])[0]
            d = np.sign(g) if step_norm == "inf" else g / np.linalg.norm(g)
            x_adv = clipf(x + rho + (-eps if target is not None else eps) * d)
            if fooled(model.predict(x_adv[None])[0], i):
                v = x_adv - x
                rho = np.clip(v, -xi, xi) if norm == "inf" else v * min(1.0, xi / np.linalg.norm(v))
        preds = model.predict(clipf(X + rho))
        if np.mean([fooled(p, i) for i, p in enumerate(preds)]) >= 1 - delta:
            break
    return rho
