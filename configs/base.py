"""Every default of lmjax, in one place. Run files override a few keys of this.

    lmjax train --config=configs/base.py --workdir=/tmp/base

Groups: model (architecture), data (what is fed), mesh (how devices are laid out), optim
(optimizer + schedule), train (loop lengths and cadences), checkpoint. No other file may invent a
default: code reads `cfg.a.b` directly, so a missing key is a bug, not a silent fallback.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for params, dropout and data order

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.vocab_size = 2048  # rows of the embedding; must be >= the tokenizer's vocabulary
    m.d_model = 256  # D: residual stream width
    m.num_layers = 4  # decoder blocks
    m.num_heads = 4  # N: query heads
    m.num_kv_heads = 4  # K: key/value heads (N = MHA, 1 = MQA, between = GQA); must divide N
    m.head_dim = 64  # H: per-head width (not forced to D / N, as in LLaMA/Gemma)
    m.mlp_dim = 1024  # F: hidden width of the MLP
    m.mlp = "swiglu"  # 'swiglu' (LLaMA: silu(xW1) * xW3 -> W2) | 'gelu' (GPT-2: gelu(xW1) -> W2)
    # | 'geglu' (Gemma: gelu(xW1) * xW3 -> W2, tanh-approximated GELU)
    m.norm = "rms"  # 'rms' (LLaMA) | 'layer' (GPT-2)
    m.norm_eps = 1e-6
    m.position = "rope"  # 'rope' | 'learned' (GPT-2) | 'sinusoidal' (Vaswani) | 'none'
    m.rope_theta = 10_000.0
    m.rope_scaling = "none"  # 'none' | 'linear' (PI, Chen 2023) | 'yarn' (Peng 2023)
    m.rope_scaling_factor = 1.0  # s: target context / rope_original_max_len (linear, yarn)
    m.rope_original_max_len = 0  # yarn: the context the model was pretrained at (its ramp needs it)
    m.rope_yarn_alpha = 1.0  # yarn: dims turning < alpha times over that context interpolate
    m.rope_yarn_beta = 32.0  # yarn: dims turning more than beta times keep their frequency
    m.attention_window = 0  # Mistral sliding window: query i sees keys i-window < j <= i; 0 = all
    m.max_len = 256  # longest sequence the position table supports (learned/sinusoidal)
    m.use_bias = False  # biases on every dense layer and norm (GPT-2 has them)
    m.tie_embeddings = False  # unembedding = embedding^T (GPT-2)
    m.embed_scale = False  # multiply the embeddings by sqrt(d_model) (Gemma)
    m.qk_norm = False  # RMS-normalise queries and keys per head (OLMo 2, Gemma 3)
    m.dropout = 0.0  # on attention output, MLP output and embeddings (GPT-2 used 0.1)
    m.init_std = 0.02  # normal init for every weight matrix (GPT-2 / nanoGPT)
    # 'sp' (standard) | 'mup' (Yang et al. 2022: LR tuned at the base width transfers to wider
    # models; init, per-layer LR, 1/H attention and logit multiplier in lmjax/mup.py)
    m.parametrization = "sp"
    # μP base shapes: the model tuned on (μP equals SP there); each hidden matrix's init and LR
    # scale with its own fan-in over these, and all must differ from the model's or none
    m.mup_base_width = 256  # d_model: fan-in of q, k, v, up, gate and the readout
    m.mup_base_attn_dim = 256  # num_heads x head_dim: fan-in of attention's o
    m.mup_base_mlp_dim = 1024  # mlp_dim: fan-in of the MLP's down
    m.mup_base_head_dim = 64  # head_dim at which its 1/H attention equals 1/sqrt(H)
    # depth-μP: branches x (L0/L)^alpha, block LRs x (L/L0)^(alpha-1); 0 = off, else L0
    m.mup_base_depth = 0
    m.mup_depth_alpha = 0.5  # 0.5 = Depth-μP (Yang et al. 2023) | 1 = CompleteP (Dey 2025)
    # μP knobs μTransfer tunes at the base width (Tensor Programs V sec. 6); 1 = Table 8 as is
    m.mup_output_mult = 1.0  # alpha_out: logits x alpha_out / m
    m.mup_attn_mult = 1.0  # alpha_attn: attention scores x alpha_attn
    m.mup_embed_mult = 1.0  # alpha_embed: token (+ position) embeddings x alpha_embed
    m.mup_readout_init_mult = 1.0  # sigma_out: readout init std = this x init_std; 0 = zeros
    m.mup_zero_query = False  # zero-init the query kernel (attention starts uniform)
    m.mup_lr_embed = 1.0  # LR factor of the embeddings
    m.mup_lr_hidden = 1.0  # LR factor of the hidden matrices (on top of 1/m)
    m.mup_lr_readout = 1.0  # LR factor of the readout
    # decay: 'independent' (mup's MuAdamW: lr x wd per step at any width) | 'scaled' (decay
    # follows each matrix's μP LR, lr/m x wd)
    m.mup_decay = "independent"
    m.param_dtype = "float32"  # master weights and optimizer state
    m.dtype = "float32"  # compute dtype of matmuls and activations ('bfloat16' on accelerators)
    # kernel (lmjax/attention.py): 'xla' (reference, everywhere) | 'cudnn' (GPU) | 'splash' (TPU)
    # | 'ring' (context parallelism, needs mesh.seq > 1) | 'auto' (the fastest this run can use)
    m.attention = "xla"
    # activation checkpointing per block: 'none' | 'full' | 'dots_saveable' | 'offload' (saved
    # matmul outputs in host memory; TPU/GPU only)
    m.remat = "none"
    # lax.scan over one stacked block: compile time flat in depth (48 layers: 1.2x the 4-layer
    # compile, unrolled 4.5x); off by default as on CPU its step costs ~30% more (lmjax bench)
    m.scan_layers = False
    # mixture of experts (lmjax/moe.py): the MLP of every every_nth_layer-th layer routes each
    # token to top_k of num_experts MLPs of expert_mlp_dim, plus shared experts seeing all tokens
    e = m.moe = ml_collections.ConfigDict()
    e.num_experts = 0  # 0 = dense MLP everywhere
    e.top_k = 2  # experts per token (Mixtral: 2 of 8)
    e.num_shared_experts = 0  # DeepSeek-MoE: experts every token goes through as well
    e.expert_mlp_dim = 1024  # F of each expert (Krajewski's granularity G = mlp_dim / this)
    e.every_nth_layer = 1  # 1 = every layer MoE; 2 = layers 2, 4, ... (GShard, Switch)
    e.score = "softmax"  # 'softmax' (Mixtral) | 'sigmoid' (DeepSeek-V3); top-k gates sum to 1
    e.aux_loss_weight = 0.01  # Switch load-balancing loss E * sum_e f_e P_e, 1 when balanced
    e.z_loss_weight = 0.001  # router z-loss mean(logsumexp(router logits)^2) (ST-MoE)
    # 'dropless' (grouped matmul, every assignment computed) | 'capacity' (each expert takes
    # capacity_factor x its fair share of the batch's assignments; the rest are dropped)
    e.dispatch = "dropless"
    e.capacity_factor = 1.25
    # dropless under mesh.expert > 1: 'ragged' (jax.lax.ragged_all_to_all: TPU, GPU) | 'padded'
    # (every slice padded to its largest: any backend, ~E x the bytes) | 'auto' (CPU: padded)
    e.exchange = "auto"

    # ---------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    # 'text' (UTF-8 files, local or gs://) | 'jsonl' | 'parquet' | 'hf' (a datasets save_to_disk
    # folder) (lmjax/data/records.py) | 'tfds' (a prepared TFDS dataset) | 'synthetic'
    d.source = "text"
    # a text shipped in lmjax/data/text, or a glob or folder (or gs://) of files of data.source
    d.text = "shakespeare"
    d.text_field = "text"  # jsonl/parquet/hf: the field holding each record's document
    d.tokenizer = "shakespeare_bpe2048"  # shipped model name, or a path to a SentencePiece .model
    d.seq_len = 256  # L: tokens per training example (the model sees L inputs, predicts L targets)
    d.global_batch_size = 32  # B: sequences per optimizer step, over all hosts and devices
    d.eval_fraction = 0.05  # tail of the text held out for evaluation
    d.eval_stride = 0  # lmjax eval of text: windows of seq_len every stride tokens; 0 = seq_len
    # source='text' from several named texts, each sampled by weight and evaluated on its own
    # (lmjax/data/mixture.py): 'name=glob:weight,...'; '' = data.text alone
    d.mixture = ""
    d.segment_mask = False  # batches carry segment_ids/positions: attend within a document only
    d.tfds_name = ""  # source='tfds': a prepared dataset ('lm1b', or one `lmjax data build` made)
    d.tfds_data_dir = ""  # where it was prepared; '' = TFDS's default (~/tensorflow_datasets)
    d.tfds_feature = "text"  # the feature holding each document's text (lm1b, c4, wikipedia)
    d.train_split = "train"  # TFDS split read for training; slices work ('train[:1%]')
    d.eval_split = "validation"  # TFDS split of the held-out batches; '' = no eval batches
    d.read_threads = 2  # grain threads reading and tokenizing documents (tfds source)
    d.prefetch = 64  # documents read ahead per process (tfds source)
    d.worker_count = 0  # grain worker processes after packing; 0 = in the training process

    # ---------------------------------------------------------------- mesh
    s = c.mesh = ml_collections.ConfigDict()
    s.data = -1  # pure data-parallel replicas; -1 = all devices not used by the other axes
    s.fsdp = 1  # parameters and optimizer state sharded (ZeRO-3), batch split too
    s.seq = 1  # context parallelism: sequence split between attention calls (attention='ring')
    s.tensor = 1  # Megatron tensor parallelism: heads and MLP width split
    s.expert = 1  # expert parallelism (MoE): experts split, tokens all-to-all; batch split too
    # The sizes above are per slice (ICI); these multiply them across slices or nodes (DCN).
    s.dcn_data = 1  # replicas across slices: one gradient all-reduce per step crosses DCN
    s.dcn_fsdp = 1  # FSDP across slices: weight gathers cross DCN (only if memory demands it)
    s.dcn_seq = 1  # context parallelism across slices: rarely worth the ring's DCN hops
    s.dcn_tensor = 1  # tensor parallelism across slices: almost never (an all-reduce per layer)
    s.dcn_expert = 1  # expert parallelism across slices: two all-to-alls per MoE layer cross DCN
    s.rules = "fsdp_tp"  # logical-axis rule preset in lmjax/sharding.py: 'dp' | 'fsdp' | 'fsdp_tp'
    # ZeRO-1 / weight-update sharding (Xu et al. 2020): gradients reduce-scattered over 'data',
    # Adam moments and the update split likewise, each replica updating 1/data of every weight
    # before an all-gather; the forward and backward stay as the rules say. Optimizer memory
    # / data for the bytes of DP's all-reduce (and faster on CPU: docs/performance.md).
    s.shard_optimizer = True

    # ---------------------------------------------------------------- optim
    o = c.optim = ml_collections.ConfigDict()
    # 'adamw' | 'muon' (hidden matrices; AdamW for the rest) | 'lion' | 'adafactor' (optim.py)
    o.name = "adamw"
    o.lr = 3e-3  # peak learning rate
    o.schedule = "cosine"  # after warmup: 'cosine' | 'linear' | 'constant' | 'rsqrt' | 'wsd'
    o.warmup_steps = 100  # linear warmup from 0 to lr
    o.end_lr_fraction = 0.1  # final lr = end_lr_fraction * lr (cosine, linear, wsd)
    o.wsd_decay_fraction = 0.2  # WSD: last fraction of training spent decaying (Hägele et al. 2024)
    o.cooldown_steps = 0  # WSD: decay over the last this many steps; 0 = wsd_decay_fraction's
    o.cooldown_shape = "linear"  # WSD's decay: 'linear' | '1-sqrt' (Hägele et al. 2024, sec. 3)
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.muon_momentum = 0.95  # Muon's Nesterov momentum (Jordan 2024; Liu et al. 2025)
    o.weight_decay = 0.1  # decoupled (AdamW), applied to matrices only
    o.decay_embeddings = False  # also decay embedding tables (norms and biases never decay)
    o.clip_norm = 1.0  # global gradient-norm clip; 0 disables
    o.z_loss = 0.0  # PaLM auxiliary loss z * log(Z)^2 keeping the softmax normaliser near 1

    # ---------------------------------------------------------------- train
    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000  # optimizer steps (the schedule's length)
    t.tokens_budget = 0.0  # > 0: train.steps := tokens / tokens per step (scaling studies); 0 = off
    t.flops_budget = 0.0  # > 0: train.steps := FLOPs / FLOPs per step (lmjax/flops.py); 0 = off
    # FLOPs of flops_budget and the logged `flops` column: 'project' (6N + causal attention) |
    # 'kaplan' (6N) | 'chinchilla' (Appendix F); MFU always uses 'project' (lmjax/flops.py)
    t.flops_convention = "project"
    t.grad_accum = 1  # micro-batches per step, accumulated inside the jitted step
    t.log_every = 10  # steps between metrics.jsonl rows and progress-bar refreshes
    # where rows go, comma-separated: 'jsonl' (metrics.jsonl, always: resume, sweeps and fits
    # read it) plus 'tensorboard' (WORKDIR/tensorboard) and 'wandb' (the [wandb] extra;
    # WANDB_MODE=offline writes WORKDIR/wandb for a later `wandb sync`)
    t.loggers = "tensorboard,jsonl"
    t.wandb_project = "lmjax"
    t.wandb_entity = ""  # '' = the W&B account's default entity
    t.eval_every = 200  # steps between held-out evaluations (0 = only at the end)
    t.eval_batches = 8  # batches of the held-out split per evaluation
    t.on_nonfinite = "stop"  # NaN/Inf loss or grad norm: 'stop' the run | 'skip' the update
    t.spike_factor = 0.0  # stop if a loss exceeds this x the mean of the last 20 (0 = off)
    # persistent XLA compilation cache, so a rerun skips compiling: 'auto' = $LMJAX_CACHE/xla
    # (else ~/.cache/lmjax/xla) | a folder | '' = off
    t.compilation_cache_dir = "auto"
    # seconds without a heartbeat after which another run may take this workdir (lmjax/lease.py)
    t.lease_timeout = 300.0

    # ---------------------------------------------------------------- profile
    p = c.profile = ml_collections.ConfigDict()
    p.start_step = 10  # first profiled step: after compilation and warm-up
    p.num_steps = 0  # steps traced into workdir/profile (TensorBoard, Perfetto); 0 = off
    t.init_from = ""  # a workdir whose weights start this run (fresh optimizer); '' = random init
    # a workdir whose whole state at train.fork_step (weights, optimizer, step, data position)
    # starts this run, e.g. a WSD cooldown from a constant-LR run; the parent is only read
    t.fork_from = ""
    t.fork_step = 0  # the parent's checkpoint to fork; 0 = where this run's WSD cooldown begins

    # ---------------------------------------------------------------- checkpoint
    k = c.checkpoint = ml_collections.ConfigDict()
    k.every = 200  # steps between saves (a final save always happens)
    k.max_to_keep = 3
    # steps also saved and never deleted, comma-separated: where cooldown forks start from
    # (train.fork_from; lmjax/scaling/sweep.py's cooldowns); '' = none
    k.keep_steps = ""
    k.async_save = True  # write in a background thread while training continues
    return c


def family(name: str, presets: dict, arg: str | None, **architecture) -> ml_collections.ConfigDict:
    """The defaults with one of a family file's PRESETS (configs/llama.py, mistral.py, qwen3.py,
    gemma.py): `architecture` is the family's model switches, each preset
    (model overrides, (seq_len, sequences per step), (peak lr, warmup steps), training tokens)."""
    if arg not in presets:
        raise ValueError(f"configs/{name}.py:{arg} is unknown; choose one of {list(presets)}.")
    model, (seq_len, batch), (lr, warmup), tokens = presets[arg]
    c = get_config()
    c.model.update(**{**architecture, **model})
    c.data.update(seq_len=seq_len, global_batch_size=batch)
    c.optim.update(lr=lr, warmup_steps=warmup)  # cosine to lr / 10, as above
    c.train.steps = tokens // (seq_len * batch)
    if arg != "tiny":  # the published sizes: weights split over every device
        c.mesh.update(data=1, fsdp=-1)
    return c
