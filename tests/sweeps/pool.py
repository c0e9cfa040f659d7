"""Three smoke members for tests/test_launch.py's sweep on a pool of fake TPU slices (a file in
the checkout: the hosts receive only what the checkout holds)."""

from configs import smoke


def get_config(arg=None):
    c = smoke.get_config()
    c.train.update(steps=12, eval_every=0)
    c.checkpoint.update(every=4)
    return c


def get_sweep():
    return [{"model.d_model": d} for d in (16, 32, 48)]
