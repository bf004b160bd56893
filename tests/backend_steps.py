"""One SGD step of a :class:`crmn.backend.Backend` as the tests read it: the batch's mean
cross-entropy and accuracy before the update, as Python floats (a host sync)."""


def train_step(backend, x, y, lr):
    loss_sum, correct = backend.step(x, y, lr)
    return float(loss_sum) / len(y), float(correct) / len(y)
