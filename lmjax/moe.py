"""A mixture-of-experts MLP (model.moe): a router picks top_k of num_experts MLPs per token.

Router: float32 logits x·W_r whatever the compute dtype (a bf16 softmax over experts flips
near-tied choices). Scores are 'softmax' (Mixtral: softmax over all experts) or 'sigmoid'
(DeepSeek-V3: one sigmoid per expert); either way the top_k gates are renormalised to sum to 1
(Mixtral, DeepSeek-V3). With top_k=1 the gate is therefore 1 and the router learns from the
load-balancing loss alone.

Two losses keep the router healthy, both averaged over MoE layers and reported (train/moe_*):

  load balance  num_experts · sum_e f_e · P_e (Switch, Fedus et al. 2022, eq. 4; GShard):
                f_e = share of the T·top_k assignments that went to expert e, P_e = mean over
                tokens of e's score (normalised over experts); 1 at perfect balance, any top_k.
  router z      mean over tokens of logsumexp(router logits)^2 (ST-MoE, Zoph et al. 2022).

Dispatch, `model.moe.dispatch`:

  dropless  every assignment is computed (MegaBlocks, Gale et al. 2022): assignments sorted by
            expert, one grouped matmul per weight (jax.lax.ragged_dot), unsorted, weighted.
  capacity  each expert takes at most C = ceil(capacity_factor · T · top_k / num_experts)
            assignments of the batch, first choices before second ones, then in token order
            (GShard); the rest are dropped (the layer adds 0 for them; the residual carries the
            token on) and their share is reported as train/moe_dropped_fraction.

Shared experts (DeepSeek-MoE) see every token: one dense MLP of num_shared_experts ·
expert_mlp_dim, built by model.py (its Mlp) and handed in.

Expert parallelism (mesh axis 'expert' > 1). Under GSPMD the scatter that groups a batch by
expert is global, and XLA places it with all-reduces of whole activations. Instead, expert
weights' leading 'expert' logical axis is split over mesh axis 'expert' (E/ep experts per
device), the batch is split over it too, and one jax.shard_map per MoE layer does, on each
device: route its own T tokens (the router, top-k and both losses stay outside, under GSPMD, so
the losses are the global batch's at any mesh); send each assignment to its expert's device;
run its E/ep experts; send the outputs back, weighted by the gates. Expert weights split over
'fsdp' are gathered inside (the gradient's transpose is the reduce-scatter), and over 'tensor'
stay split, with the outputs summed (Megatron's MLP). lmjax plan prints the bytes against
theory (top_k · D per token each way).

  capacity  queues of [E, C, D] with C = ceil(capacity_factor · T · top_k / E) of the
            *device's* T go by all_to_all: capacity_factor · top_k · D values per token each
            way. Drops depend on the mesh (per-device queues, GShard's groups).
  dropless  the assignments, sorted by expert, go by a ragged all-to-all (MaxText's
            dropless path; MegaBlocks with expert parallelism) into a receive buffer grouped
            by local expert, run as one ragged_dot per weight and return the same way. Static
            shapes need a buffer for the worst case, every device's T · top_k rows for this
            device's experts (ep times a balanced share). XLA:CPU has no ragged-all-to-all:
            there model.moe.exchange='auto' takes backends/cpu.py's padded one (every one of
            the E slices padded to T · top_k rows: E times the bytes, the same numbers).

With room for every assignment (dropless always) the result is expert=1's
(tests/test_moe_parallel.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from lmjax import config, mup, sharding
from lmjax.backends import cpu as cpu_backend

SCORES = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")
EXCHANGES = ("auto", "ragged", "padded")  # dropless under expert parallelism: resolve_exchange
STATS = ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction")  # each MoE layer's, averaged


def is_moe_layer(cfg: ml_collections.ConfigDict, index: int) -> bool:
    """Layer `index` (from 0) is MoE when experts are on and it is an every_nth_layer-th layer
    (every_nth_layer=2: layers 1, 3, 5, ..., GShard's and Switch's alternation)."""
    return cfg.moe.num_experts > 0 and (index + 1) % cfg.moe.every_nth_layer == 0


def num_moe_layers(cfg: ml_collections.ConfigDict) -> int:
    return sum(is_moe_layer(cfg, i) for i in range(cfg.num_layers))


def activate(kind: str, up: jax.Array, gate: jax.Array | None) -> jax.Array:
    """The MLP nonlinearity of model.mlp, shared by the dense MLP and the experts."""
    if kind == "swiglu":  # Shazeer 2020: silu(x W_gate) * (x W_up)
        return jax.nn.silu(gate) * up
    if kind == "geglu":  # Gemma: the same gate through tanh-approximated GELU
        return jax.nn.gelu(gate, approximate=True) * up
    return jax.nn.gelu(up, approximate=True)  # GPT-2 uses the tanh approximation of GELU


def route(logits_TE: jax.Array, top_k: int, score: str
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(gates_TK summing to 1 per token, experts_TK, probs_TE: scores normalised over experts)."""
    if score == "softmax":
        probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    else:
        scores_TE = jax.nn.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdims=True)
    top_TK, experts_TK = jax.lax.top_k(probs_TE, top_k)
    return top_TK / top_TK.sum(-1, keepdims=True), experts_TK, probs_TE


def balance_loss(probs_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
    """num_experts · sum_e f_e · P_e (module docstring)."""
    E = probs_TE.shape[-1]
    f_E = jax.nn.one_hot(experts_TK, E, dtype=jnp.float32).mean((0, 1))
    return E * jnp.sum(f_E * probs_TE.mean(0))


def z_loss(logits_TE: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))


def capacity(tokens: int, cfg: ml_collections.ConfigDict) -> int:
    """Assignments each expert takes under dispatch='capacity'."""
    m = cfg.moe
    return max(1, math.ceil(m.capacity_factor * tokens * m.top_k / m.num_experts))


class Moe(nnx.Module):
    """x [B, L, D] -> (y [B, L, D], {STATS: scalars}); `shared` is the shared experts' MLP."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
                 shared: nnx.Module | None = None):
        D, E, F = cfg.d_model, cfg.moe.num_experts, cfg.moe.expert_mlp_dim
        std = cfg.init_std  # as model.Mlp's under SP (μP is refused with experts: validate)
        out_std = cfg.init_std / mup.residual_divisor(cfg)  # GPT-2's residual scaling

        def param(std, shape, names):
            init = nnx.with_partitioning(nnx.initializers.normal(std), names,
                                         eager_sharding=False)
            return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))

        self.router = param(cfg.init_std, (D, E), ("embed", None))
        self.up = param(std, (E, D, F), ("expert", "embed", "mlp"))
        gated = cfg.mlp != "gelu"
        self.gate = param(std, (E, D, F), ("expert", "embed", "mlp")) if gated else None
        self.down = param(out_std, (E, F, D), ("expert", "mlp", "embed"))
        self.shared = shared
        self.cfg = cfg

    def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        m, (B, L, D) = self.cfg.moe, x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        logits_TE = x_TD.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        gates_TK, experts_TK, probs_TE = route(logits_TE, m.top_k, m.score)
        if expert_ways() > 1:
            K = m.top_k
            y_BLD, dropped = self._expert_parallel(x_BLD, experts_TK.reshape(B, L, K),
                                                   gates_TK.reshape(B, L, K))
        elif m.dispatch == "dropless":
            y_BLD, dropped = self._dropless(x_TD, experts_TK, gates_TK).reshape(B, L, D), 0.0
        else:
            y_TD, dropped = self._capacity(x_TD, experts_TK, gates_TK, self._experts_ECD)
            y_BLD = y_TD.reshape(B, L, D)
        dropped = jnp.float32(dropped)
        if self.shared is not None:
            y_BLD = y_BLD + self.shared(x_BLD)
        stats = (balance_loss(probs_TE, experts_TK), z_loss(logits_TE), dropped)
        return y_BLD, dict(zip(STATS, stats, strict=True))

    def _experts(self, x_SD: jax.Array, matmul, weights: tuple | None = None) -> jax.Array:
        """Each expert's MLP on its own rows; matmul(x, stacked weight [E, ...]); `weights`
        (up, down, gate): this device's, where they are not the module's."""
        up, down, gate = weights or (self.up[...], self.down[...],
                                     None if self.gate is None else self.gate[...])
        dtype = x_SD.dtype
        h = matmul(x_SD, up.astype(dtype))
        h = activate(self.cfg.mlp, h, None if gate is None else matmul(x_SD, gate.astype(dtype)))
        return matmul(h, down.astype(dtype))

    def _dropless(self, x_TD, experts_TK, gates_TK) -> jax.Array:
        x_SD, order_S, sizes_E = _by_expert(x_TD, experts_TK, self.cfg.moe.num_experts)
        y_SD = self._experts(x_SD, lambda x, w: jax.lax.ragged_dot(x, w, sizes_E))
        return _combine(y_SD, order_S, gates_TK)

    def _experts_ECD(self, x_ECD: jax.Array) -> jax.Array:
        return self._experts(x_ECD, lambda x, w: jnp.einsum("ecd,edf->ecf", x, w))

    def _capacity(self, x_TD, experts_TK, gates_TK, experts_fn) -> tuple[jax.Array, jax.Array]:
        """experts_fn: the [E, C, D] queues -> the experts' outputs, here or on other devices."""
        (T, K), E = experts_TK.shape, self.cfg.moe.num_experts
        C = capacity(T, self.cfg)
        onehot_KTE = jax.nn.one_hot(experts_TK.T, E, dtype=jnp.int32)  # first choices first
        position_KTE = jnp.cumsum(onehot_KTE.reshape(K * T, E), axis=0).reshape(K, T, E) - 1
        position_TK = jnp.sum(position_KTE * onehot_KTE, axis=-1).T  # place in its queue
        keep_TK = position_TK < C
        slot_S = jnp.where(keep_TK, experts_TK * C + position_TK, E * C).reshape(-1)  # E·C: bin
        x_SD = jnp.repeat(x_TD, K, axis=0)  # token-major, as slot_S
        buffer = jnp.zeros((E * C + 1, x_TD.shape[-1]), x_TD.dtype).at[slot_S].set(x_SD)
        y_ECD = experts_fn(buffer[:-1].reshape(E, C, -1))
        y_buffer = jnp.concatenate([y_ECD.reshape(E * C, -1), jnp.zeros_like(buffer[:1])])
        y_TKD = y_buffer[slot_S].reshape(T, K, -1)
        weights_TK = (gates_TK * keep_TK).astype(y_TKD.dtype)
        return jnp.einsum("tkd,tk->td", y_TKD, weights_TK), 1 - keep_TK.mean(dtype=jnp.float32)

    def _expert_parallel(self, x_BLD, experts_BLK, gates_BLK) -> tuple[jax.Array, jax.Array]:
        """Each device's own tokens to its E/ep experts' devices and back over mesh axis
        'expert' (module docstring); 'embed' split over fsdp is gathered, 'mlp' split over
        tensor is summed (Megatron's MLP)."""
        mesh, rules = jax.sharding.get_abstract_mesh(), dict(spmd.get_logical_axis_rules())
        batch, length, embed, mlp = (sharding.axes_of(rules.get(name)) for name in (
            "activation_batch", "activation_length", "embed", "mlp"))
        mlp = tuple(a for a in mlp if mesh.shape[a] > 1)  # a psum over 1 device is a copy
        act = P(batch or None, length or None)
        d_axes, f_axes = embed or None, mlp or None  # mesh axes of the weights' D and F
        w_in, w_out = P("expert", d_axes, f_axes), P("expert", f_axes, d_axes)
        gated = self.gate is not None
        weights = (self.up[...], self.down[...]) + ((self.gate[...],) if gated else ())

        def local(x_BLD, experts_BLK, gates_BLK, up, down, gate=None):
            if embed:  # FSDP's gather, by hand; its transpose reduce-scatters the gradient
                up, down = (jax.lax.all_gather(w, embed, axis=a, tiled=True)
                            for w, a in ((up, 1), (down, 2)))
                gate = None if gate is None else jax.lax.all_gather(gate, embed, axis=1,
                                                                    tiled=True)

            def experts(x, matmul):  # this device's experts; partial sums over 'tensor' added
                y = self._experts(x, matmul, (up, down, gate))
                return jax.lax.psum(y, mlp) if mlp else y

            (B, L, D), K = x_BLD.shape, experts_BLK.shape[-1]
            x_TD, experts_TK = x_BLD.reshape(B * L, D), experts_BLK.reshape(B * L, K)
            gates_TK = gates_BLK.reshape(B * L, K)
            if self.cfg.moe.dispatch == "dropless":
                y_TD, dropped = self._dropless_exchange(x_TD, experts_TK, gates_TK, experts), 0.0
            else:
                y_TD, dropped = self._capacity(x_TD, experts_TK, gates_TK,
                                               lambda x: self._queues_exchange(x, experts))
            return y_TD.reshape(B, L, D), jnp.float32(dropped).reshape(1, 1)

        y_BLD, dropped = jax.shard_map(
            local, mesh=mesh, in_specs=(act, act, act, w_in, w_out) + ((w_in,) if gated else ()),
            out_specs=(act, act))(x_BLD, experts_BLK, gates_BLK, *weights)
        return y_BLD, dropped.mean()

    def _queues_exchange(self, x_ECD: jax.Array, experts) -> jax.Array:
        """Capacity: every device's [E, C, D] queues to the queues' experts and back."""
        (E, C, D), ep = x_ECD.shape, jax.lax.axis_size("expert")
        x = jax.lax.all_to_all(x_ECD.reshape(ep, E // ep, C, D), "expert", 0, 0, tiled=True)
        x = x.transpose(1, 0, 2, 3).reshape(E // ep, ep * C, D)  # my experts' queues
        y = experts(x, lambda x, w: jnp.einsum("ecd,edf->ecf", x, w))
        y = y.reshape(E // ep, ep, C, D).transpose(1, 0, 2, 3)
        return jax.lax.all_to_all(y, "expert", 0, 0, tiled=True).reshape(E, C, D)

    def _dropless_exchange(self, x_TD, experts_TK, gates_TK, experts) -> jax.Array:
        """Dropless: each device's assignments, sorted by expert, go to their experts' devices
        by a ragged all-to-all (slice e: the rows for expert e), land grouped by local expert
        (then by sender), run as one ragged_dot per weight and come back the same way. Every
        offset follows from one all-gather of the devices' per-expert counts. The receive
        buffer holds the worst case, every device's T·K rows for this device's experts."""
        (T, K), E = experts_TK.shape, self.cfg.moe.num_experts
        ep, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
        name = self.cfg.moe.exchange  # as train.with_kernel resolved it for the mesh's platform
        name = resolve_exchange(name) if name == "auto" else name
        exchange = functools.partial(jax.lax.ragged_all_to_all if name == "ragged" else
                                     cpu_backend.padded_ragged_all_to_all, axis_name="expert")
        x_SD, order_S, sizes_E = _by_expert(x_TD, experts_TK, E)  # so grouped by device too
        counts_PE = jax.lax.all_gather(sizes_E, "expert")  # rows device p sends expert e
        taken_PE = jnp.cumsum(counts_PE, 1) - counts_PE  # where in device p's sorted rows
        totals_QJ = counts_PE.sum(0).reshape(ep, E // ep)  # expert j of device q: its rows
        group_E = (jnp.cumsum(totals_QJ, 1) - totals_QJ).reshape(E)  # its start there
        land_PE = group_E + jnp.cumsum(counts_PE, 0) - counts_PE  # then after devices < p
        mine_PJ = _columns(counts_PE, me, ep)  # what my experts get from each device
        # zeros_like: as x_SD, varying over the mesh; an invariant buffer would make its
        # (unused) cotangent an all-reduce of the whole buffer over every device
        there_RD = exchange(x_SD, jnp.zeros_like(x_SD, shape=(ep * T * K, x_SD.shape[1])),
                            taken_PE[me], sizes_E, land_PE[me], mine_PJ.reshape(-1))
        y_RD = experts(there_RD, lambda x, w: jax.lax.ragged_dot(x, w, mine_PJ.sum(0)))
        y_SD = exchange(y_RD, jnp.zeros_like(x_SD), _columns(land_PE, me, ep).reshape(-1),
                        mine_PJ.reshape(-1), _columns(taken_PE, me, ep).reshape(-1), sizes_E)
        return _combine(y_SD, order_S, gates_TK)


def _by_expert(x_TD: jax.Array, experts_TK: jax.Array, num_experts: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(rows of the S = T·K assignments grouped by expert, the order that groups them, each
    expert's count): what a grouped matmul (ragged_dot) takes."""
    flat_S = experts_TK.reshape(-1)  # token-major
    order_S = jnp.argsort(flat_S, stable=True)
    sizes_E = jnp.bincount(flat_S, length=num_experts).astype(jnp.int32)
    return x_TD[order_S // experts_TK.shape[1]], order_S, sizes_E


def _columns(a_PE: jax.Array, me: jax.Array, ep: int) -> jax.Array:
    """The columns of device `me`'s E/ep experts."""
    width = a_PE.shape[1] // ep
    return jax.lax.dynamic_slice_in_dim(a_PE, me * width, width, axis=1)


def _combine(y_SD: jax.Array, order_S: jax.Array, gates_TK: jax.Array) -> jax.Array:
    """Expert outputs in sorted order back to their tokens, weighted by the gates, summed."""
    T, K = gates_TK.shape
    y_TKD = y_SD[jnp.argsort(order_S)].reshape(T, K, -1)
    return jnp.einsum("tkd,tk->td", y_TKD, gates_TK.astype(y_TKD.dtype))


def resolve_exchange(name: str, platform: str | None = None) -> str:
    """model.moe.exchange for `platform` (default: JAX's backend): 'auto' is the native ragged
    all-to-all where XLA has one (TPU, GPU) and the padded one on CPU, which has none."""
    if name not in EXCHANGES:
        raise ValueError(f"model.moe.exchange={name!r} is not one of {EXCHANGES}.")
    platform = platform or jax.default_backend()
    if name == "auto":
        return "padded" if platform == "cpu" else "ragged"
    if name == "ragged" and platform == "cpu":
        raise ValueError("model.moe.exchange='ragged' needs a TPU or GPU: XLA:CPU has no ragged "
                         "all-to-all; use 'padded' or 'auto'.")
    return name


def expert_ways() -> int:
    """Devices of mesh axis 'expert' in the current mesh (1 outside one): > 1 turns on
    expert parallelism."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "expert" not in mesh.shape else mesh.shape["expert"]


def mean_stats(per_layer: list[dict]) -> dict[str, jax.Array]:
    """Each statistic averaged over the MoE layers ({} for a dense model): the losses' weights
    then mean the same at any depth."""
    per_layer = [s for s in per_layer if s]
    if not per_layer:
        return {}
    return {k: jnp.mean(jnp.stack([s[k] for s in per_layer])) for k in STATS}


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first model.moe setting no model can be built with."""
    m = cfg.model
    config.check_choices(cfg, {"model.moe.score": SCORES, "model.moe.dispatch": DISPATCHES,
                               "model.moe.exchange": EXCHANGES})
    e = m.moe
    if not e.num_experts:
        return
    if e.top_k > e.num_experts:
        raise ValueError(f"model.moe.top_k={e.top_k} exceeds model.moe.num_experts="
                         f"{e.num_experts}.")
    if e.every_nth_layer > m.num_layers:
        raise ValueError(f"model.moe.every_nth_layer={e.every_nth_layer} exceeds "
                         f"model.num_layers={m.num_layers}, so no layer would be MoE.")
    if m.scan_layers and e.every_nth_layer > 1:
        raise ValueError("model.scan_layers scans one block shape, so it needs "
                         "model.moe.every_nth_layer=1 (every layer MoE).")
    if m.use_bias:
        raise ValueError("model.moe experts have no biases; set model.use_bias=False.")
    if m.parametrization == "mup":
        raise ValueError("model.parametrization='mup' has no rule for expert weights yet; use "
                         "'sp' with model.moe.num_experts > 0.")


def validate_expert_axis(m: ml_collections.ConfigDict, ways: int) -> None:
    """Expert parallelism splits whole experts (Moe._expert_parallel); `ways` is the expert
    axis' size, `m` the model config."""
    if ways == 1:
        return
    if not m.moe.num_experts:
        raise ValueError(f"mesh.expert x mesh.dcn_expert = {ways} splits experts, but the model "
                         f"has none (model.moe.num_experts=0); split the batch with mesh.data.")
    if m.moe.num_experts % ways:
        raise ValueError(f"model.moe.num_experts={m.moe.num_experts} is not divisible by the "
                         f"expert axis (mesh.expert x mesh.dcn_expert = {ways}).")
