"""One SGD step of a :class:`crmn.stack.Stack` as the tests read it: the batch's mean
cross-entropy and accuracy before the update, as Python floats (a host sync)."""


def train_step(stack, x, y, lr):
    loss_sum, correct = stack.step(x, y, lr)
    return float(loss_sum) / len(y), float(correct) / len(y)
