"""A few-second CPU run: the configuration the tests train.

    lmjax train --config=configs/smoke.py --workdir=/tmp/smoke
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   max_len=32)
    c.data.update(seq_len=32, global_batch_size=8)
    c.optim.update(lr=1e-2, warmup_steps=5)
    c.train.update(steps=20, log_every=1, eval_every=10, eval_batches=2)
    c.checkpoint.update(every=10, async_save=True)
    return c
