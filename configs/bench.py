"""The `bench` model: a 4-layer LLaMA-shaped decoder small enough to time on one CPU.

    lmjax bench --model=bench --steps=20
    lmjax bench --model=bench --devices=8 --config.data.global_batch_size=32

8,390,912 params, half of them in the embedding and the untied unembedding (2.1M each).
Every shape is set here, not inherited from base.py, so its figures stay comparable over time
and with other codebases' runs of the same model (MaxText: vocab 8192, d_model 256, 4 layers,
4 heads of 64, SwiGLU 1024, seq 256, batch 8, float32).
"""

from configs import base


def get_config(arg: str | None = None):
    del arg
    c = base.get_config()
    c.model.update(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
                   head_dim=64, mlp_dim=1024, mlp="swiglu", norm="rms", position="rope",
                   use_bias=False, tie_embeddings=False, param_dtype="float32", dtype="float32")
    c.data.update(source="synthetic", seq_len=256, global_batch_size=8)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
