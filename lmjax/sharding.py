"""The device mesh and how logical axis names map onto it.

The model names axes ('embed', 'mlp', 'activation_batch', ...); a RULES preset says which mesh
axis each name is split over. Changing the parallelism strategy means picking another preset,
never editing the model (Flax lm1b, MaxText). Mesh axes:

  data    replicas that each hold a full copy of the parameters (pure data parallelism)
  fsdp    parameters, gradients and optimizer state split ZeRO-3 style; the batch is split too
  seq     context parallelism: activations split along the sequence between attention calls;
          attention itself gathers keys (xla) or passes them round a ring (ring attention)
  tensor  Megatron tensor parallelism: attention heads and MLP width split, one all-reduce per
          attention and MLP block
  expert  expert parallelism: MoE expert weights split by expert, tokens sent to their experts'
          devices and back by all-to-all (lmjax/moe.py); the batch is split too, so
          it is a data axis for every other layer

Each axis is ici x dcn devices: `mesh.<axis>` ways within a slice (or node), times
`mesh.dcn_<axis>` ways across slices (or nodes) over the slower data-center network
(MaxText's ici_*/dcn_* parallelism). Put only cheap traffic on DCN: data, or fsdp.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lmjax import config
from lmjax.data import batch as batch_lib

AXES = ("data", "fsdp", "seq", "tensor", "expert")  # slowest to fastest varying
BATCH = ("data", "fsdp", "expert")  # the batch dimension of every input is split over these

_ACTIVATIONS = {
    "activation_batch": BATCH,
    "activation_length": "seq",  # size 1 unless context parallelism is on
    "activation_embed": None,
    "activation_head_dim": None,
}
_REPLICATED = {name: None for name in
               ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "length",
                "layers")}  # layers: model.scan_layers' stacked axis, never split
_REPLICATED["expert"] = "expert"  # MoE expert weights' leading axis: split when mesh.expert > 1

RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # Pure data parallelism: every device holds every parameter.
    "dp": {**_REPLICATED, **_ACTIVATIONS, "activation_heads": None, "activation_mlp": None,
           "activation_vocab": None},
    # FSDP (ZeRO-3): each weight matrix split along its model-width dimension.
    "fsdp": {**_REPLICATED, **_ACTIVATIONS, "embed": "fsdp", "activation_heads": None,
             "activation_mlp": None, "activation_vocab": None},
    # FSDP + Megatron TP: heads, kv heads, MLP width and vocabulary on 'tensor'.
    "fsdp_tp": {**_REPLICATED, **_ACTIVATIONS, "embed": "fsdp", "heads": "tensor",
                "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
                "activation_heads": "tensor", "activation_mlp": "tensor",
                "activation_vocab": "tensor"},
}


def rules(name: str) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The preset as the (logical, mesh) pairs nnx.logical_axis_rules takes."""
    return tuple(RULES[name].items())


def axes_of(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes one entry of a PartitionSpec or rule names: None, one name, or several."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Axis sizes (ici x dcn), with one ici -1 filled by the devices the others leave."""
    dcn = dcn_shape(cfg)
    return tuple(i * d for i, d in zip(ici_shape(cfg, num_devices), dcn, strict=True))


def dcn_shape(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    sizes = [cfg.mesh[f"dcn_{a}"] for a in AXES]
    if any(s < 1 for s in sizes):
        named = ", ".join(f"mesh.dcn_{a}={s}" for a, s in zip(AXES, sizes, strict=True))
        raise ValueError(f"Mesh {named} is invalid: DCN sizes must be at least 1.")
    return tuple(sizes)


def ici_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """The per-slice axis sizes: the devices divided by the DCN ways are what each slice has."""
    sizes = [cfg.mesh[a] for a in AXES]
    named = ", ".join(f"mesh.{a}={s}" for a, s in zip(AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh {named} is invalid: use positive sizes and at most one -1.")
    slices = math.prod(dcn_shape(cfg))
    if num_devices % slices:
        raise ValueError(f"The {num_devices} devices do not split into the {slices} slices that "
                         f"the mesh.dcn_* sizes multiply to.")
    per_slice = num_devices // slices
    fixed = math.prod(s for s in sizes if s != -1)
    if per_slice % fixed or (-1 not in sizes and fixed != per_slice):
        where = f" per slice (of {slices})" if slices > 1 else ""
        raise ValueError(f"Mesh {named} does not divide the {per_slice} available devices"
                         f"{where}.")
    return tuple(per_slice // fixed if s == -1 else s for s in sizes)


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Raise ValueError naming the first setting the mesh cannot hold (mesh.*, and the sizes
    each axis splits: heads and widths, data.seq_len, the micro-batch); return the mesh shape."""
    m, d = cfg.model, cfg.data
    config.check_choices(cfg, {"mesh.rules": tuple(RULES)})
    shape = mesh_shape(cfg, num_devices)
    sizes = dict(zip(AXES, shape, strict=True))
    if cfg.mesh.rules == "fsdp_tp":
        for key in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
            if m[key] % sizes["tensor"]:
                raise ValueError(f"model.{key}={m[key]} is not divisible by the tensor axis "
                                 f"(mesh.tensor={sizes['tensor']}).")
    if cfg.mesh.rules in ("fsdp", "fsdp_tp") and m.d_model % sizes["fsdp"]:
        raise ValueError(f"model.d_model={m.d_model} is not divisible by the fsdp axis "
                         f"(mesh.fsdp={sizes['fsdp']}).")
    if m.attention == "ring" and sizes["seq"] < 2:
        raise ValueError("model.attention='ring' needs a sequence axis to pass keys round: set "
                         "mesh.seq (x mesh.dcn_seq) to 2 or more.")
    if d.seq_len % sizes["seq"]:
        raise ValueError(f"data.seq_len={d.seq_len} is not divisible by the seq axis "
                         f"(mesh.seq x mesh.dcn_seq = {sizes['seq']}).")
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if d.global_batch_size % cfg.train.grad_accum:
        raise ValueError(f"data.global_batch_size={d.global_batch_size} is not divisible by "
                         f"train.grad_accum={cfg.train.grad_accum}.")
    micro = d.global_batch_size // cfg.train.grad_accum
    ways = " x mesh.expert" if sizes["expert"] > 1 else ""
    if micro % batch_ways:
        raise ValueError(f"The micro-batch of {micro} sequences (data.global_batch_size / "
                         f"train.grad_accum) is not divisible by the {batch_ways} data-parallel "
                         f"devices (mesh.data x mesh.fsdp{ways}).")
    return shape


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    grid = device_grid(cfg, devices)
    return jax.sharding.Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(cfg: ml_collections.ConfigDict, devices) -> np.ndarray:
    """Devices laid out as the mesh: within a slice by ICI topology, slices along the DCN sizes.

    A slice is what `slice_index` says (multi-slice TPU), else a process (multi-node GPU, one
    process per node). With neither (one process, e.g. fake CPU devices), consecutive blocks of
    devices stand in for slices, so a hybrid mesh can be debugged on a laptop.
    """
    ici, dcn = ici_shape(cfg, len(devices)), dcn_shape(cfg)
    if math.prod(dcn) == 1:
        return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    slices = math.prod(dcn)
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        granule = [d.slice_index for d in devices]
    elif len({d.process_index for d in devices}) > 1:
        granule = [d.process_index for d in devices]
    else:
        granule = [i * slices // len(devices) for i in range(len(devices))]
    if len(set(granule)) != slices:
        raise ValueError(f"The mesh.dcn_* sizes multiply to {slices} slices, but the devices "
                         f"come in {len(set(granule))}.")
    tagged = [_InSlice(d, g) for d, g in zip(devices, granule, strict=True)]
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, tagged, allow_split_physical_axes=True)
    return np.vectorize(lambda t: t.device, otypes=[object])(grid)


class _InSlice:
    """A device seen with the slice it belongs to, the attribute mesh_utils groups by."""

    def __init__(self, device, slice_index: int):
        self.device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self.device, name)


def constrain(x: jax.Array, logical: tuple[str, ...]) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside a mesh and rules context."""
    if not spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spmd.apply_rules(P(*logical), None))


def embed_lookup(table_VD: jax.Array, tokens_BL: jax.Array) -> jax.Array:
    """Rows of the embedding table for each token, without gathering a vocab-split table.

    When the rules split 'vocab' (TP), each device looks up the tokens that fall in its slice of
    the vocabulary, zeros the others, and one all-reduce of the [B, L, D] activations sums the
    slices (Megatron's vocab-parallel embedding): the full table never exists on a device, and
    its gradient stays split as the table is. With only 'embed' split (FSDP), XLA partitions
    the lookup itself: tokens' rows travel by all-to-all to the devices holding their columns,
    and the table's gradient is never whole on a device (a replicated copy's gradient is
    all-reduced whole: LLaMA-2 7B on v5p-64, 500 MiB per chip and step against 128 MiB of
    all-to-all). Otherwise rows come from a replicated copy (a lookup into a table split on
    both axes makes XLA rematerialise it anyway, with a warning).
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = dict(spmd.get_logical_axis_rules() or ())
    axes = axes_of(rules.get("vocab"))
    ways = 1 if mesh.empty else math.prod(mesh.shape[a] for a in axes)
    if ways == 1 and not mesh.empty and any(mesh.shape[a] > 1
                                            for a in axes_of(rules.get("embed"))):
        return jnp.take(table_VD, tokens_BL, axis=0)
    if ways == 1:
        return jnp.take(constrain(table_VD, (None, None)), tokens_BL, axis=0)

    def local(table_VD, tokens_BL):
        rows = table_VD.shape[0]
        start = jax.lax.axis_index(axes) * rows
        mine_BL = (tokens_BL >= start) & (tokens_BL < start + rows)
        x_BLD = jnp.take(table_VD, jnp.where(mine_BL, tokens_BL - start, 0), axis=0)
        return jax.lax.psum(jnp.where(mine_BL[..., None], x_BLD, 0), axes)

    table_VD = constrain(table_VD, ("vocab", None))  # FSDP's usual gather of the embed dim
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P()), out_specs=P(),
                         axis_names=set(axes))(table_VD, tokens_BL)


def data_dim(spec: P, shape: tuple[int, ...], mesh_sizes: dict[str, int]) -> int | None:
    """The first dimension of a `shape` leaf laid out as `spec` that is not split yet (its axes,
    if any, all of size 1) and that mesh axis 'data' divides; None if there is none (a small
    bias) or 'data' has one device. Where mesh.shard_optimizer splits a weight's Adam moments,
    its update and its gradient's reduce-scatter."""
    data = mesh_sizes["data"]
    dims = list(spec) + [None] * (len(shape) - len(spec))
    for i, (size, axes) in enumerate(zip(shape, dims, strict=True)):
        if data > 1 and math.prod(mesh_sizes[a] for a in axes_of(axes)) == 1 and size % data == 0:
            return i
    return None


def over_data(spec: P, shape: tuple[int, ...], mesh_sizes: dict[str, int]) -> P:
    """`spec` with mesh axis 'data' added to `data_dim`; unchanged (replicated over 'data')
    where there is no such dimension."""
    i = data_dim(spec, shape, mesh_sizes)
    if i is None:
        return spec
    dims = list(spec) + [None] * (len(shape) - len(spec))
    axes = axes_of(dims[i])
    dims[i] = (*axes, "data") if axes else "data"
    return P(*dims)


def over_data_constraint(grads: nnx.State) -> nnx.State:
    """Each gradient laid out as its Adam moments are (`over_data`), inside jit under the mesh:
    ZeRO-1's update of a 1/data slice per replica."""
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    return jax.tree.map(
        lambda g, spec: jax.lax.with_sharding_constraint(g, over_data(spec, g.shape, sizes)),
        grads, nnx.get_partition_spec(grads))


def without_axis(rules_pairs, axis: str) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Logical axis rules with mesh axis `axis` taken out of every mapping: the rules inside a
    shard_map that is manual over `axis`, where each device already holds its own slice."""
    def drop(mapped):
        kept = tuple(a for a in axes_of(mapped) if a != axis)
        return kept[0] if len(kept) == 1 else kept or None

    return tuple((name, drop(mapped)) for name, mapped in rules_pairs)


def summed_grads(grads_fn, params, rest, batch, key, cfg: ml_collections.ConfigDict):
    """grads_fn(params, rest, batch, key) -> (aux, grads) of the whole global batch: gradients
    whole on every 'data' replica, or under mesh.shard_optimizer (ZeRO-1) each replica's 1/data
    slice, the one its Adam moments hold."""
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    if not cfg.mesh.shard_optimizer or sizes["data"] == 1:
        return grads_fn(params, rest, batch, key)
    if has_own_shard_map(cfg, sizes):
        aux, grads = grads_fn(params, rest, batch, key)
    else:
        aux, grads = reduce_scattered_grads(grads_fn, params, rest, batch, key)
    return aux, over_data_constraint(grads)  # (after the reduce-scatter: the whole spec fixed)


def has_own_shard_map(cfg: ml_collections.ConfigDict, sizes: dict[str, int]) -> bool:
    """Whether the model runs a shard_map of its own (ring or splash attention, a vocab-split
    embedding lookup, expert parallelism). Nested in reduce_scattered_grads' manual 'data'
    region it fails to lower in JAX 0.10 (its jvp residuals are named with the parent's 'data'
    axis); there ZeRO-1 falls back to a sharding constraint on the gradients
    (over_data_constraint), which costs a full all-reduce instead of the reduce-scatter."""
    vocab = axes_of(RULES[cfg.mesh.rules]["vocab"])
    return (cfg.model.attention in ("ring", "splash") or math.prod(sizes[a] for a in vocab) > 1
            or sizes["expert"] > 1)


def reduce_scattered_grads(grads_fn, params, rest, batch, key):
    """ZeRO-1's gradients: each 'data' replica computes its rows' gradients alone, and one
    reduce-scatter per weight leaves replica i the sum of its 1/data slice (over_data),
    the slice its Adam moments hold.

    Written by hand (shard_map, manual over 'data' only; FSDP/TP stay XLA's) because XLA lowers
    the same layout asked for with sharding constraints (on the gradients, or on their
    cotangents inside the backward pass) as an all-reduce of every gradient and a slice, on CPU
    and on TPU alike: for the bench model on v5p-8 (data=4), 96.0 MiB sent per chip and step
    against 57.3 MiB this way (lmjax plan --topology=v5p-8, 2026-12-03). With grad_accum,
    micro-batch gradients add up locally: one reduce-scatter a step, not one all-reduce per
    micro-batch. Dropout masks differ per replica (the key is folded with the replica index),
    so they are not the ones a 1-device run draws.
    """
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape)
    leaves, treedef = jax.tree.flatten(params)
    specs = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, P))
    dims = [data_dim(spec, x.shape, sizes) for spec, x in zip(specs, leaves, strict=True)]
    local_rules = without_axis(spmd.get_logical_axis_rules(), "data")

    def local(leaves, rest, batch, key):
        # varying over 'data': each replica's gradient stays its own until the reduce-scatter
        leaves = [jax.lax.pcast(x, "data", to="varying") for x in leaves]
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        with nnx.logical_axis_rules(local_rules):
            aux, grads = grads_fn(jax.tree.unflatten(treedef, leaves), rest, batch, key)
        summed = [jax.lax.psum(g, "data") if d is None else
                  jax.lax.psum_scatter(g, "data", scatter_dimension=d, tiled=True)
                  for g, d in zip(jax.tree.leaves(grads), dims, strict=True)]
        return jax.lax.psum(aux, "data"), summed

    out_specs = [P() if d is None else P(*(None,) * d, "data") for d in dims]
    aux, summed = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P()),
                                out_specs=(P(), out_specs), axis_names={"data"})(
        leaves, rest, batch, key)
    return aux, jax.tree.unflatten(treedef, summed)


def shard_optimizer_state(shardings, abstract_state, mesh: jax.sharding.Mesh):
    """The train state's shardings with every optimizer-state leaf also split over 'data'."""
    def place(path, x, s):
        if "opt_state" not in jax.tree_util.keystr(path):
            return s
        return NamedSharding(mesh, over_data(s.spec, x.shape, dict(mesh.shape)))

    return jax.tree_util.tree_map_with_path(place, abstract_state, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The batch over BATCH's axes that `mesh` has (a hand-made mesh may lack some)."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH if a in mesh.axis_names)))


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into one global array split over the batch axes, once
    they are checked against the batch contract (lmjax/data/batch.py)."""
    batch_lib.check(batch)
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def expected_spec(logical: tuple[str | None, ...], preset: str) -> P:
    return P(*(RULES[preset][name] if name else None for name in logical))


def check_divisible(abstract_state, mesh: jax.sharding.Mesh, preset: str) -> None:
    """Fail before compiling if a parameter dimension does not split evenly over its mesh axes."""
    for path, var in _logical_params(abstract_state):
        for dim, name in zip(var.shape, var.get_metadata()["out_sharding"], strict=True):
            axes = axes_of(RULES[preset][name] if name else None)
            ways = math.prod(mesh.shape[a] for a in axes)
            if dim % ways:
                raise ValueError(
                    f"Parameter {path} has {name!r} of size {dim}, which does not split over "
                    f"mesh axes {axes} of {ways} devices; change the model size or the mesh.")


def assert_sharded(state, preset: str, min_size: int = 2**14) -> list[str]:
    """Every parameter of at least `min_size` elements is laid out as the preset says.

    Returns a description of each mismatch (empty when all is well), so callers decide whether a
    mismatch is fatal (tests) or a warning (a user's odd mesh).
    """
    problems = []
    for path, var in _logical_params(state):
        if math.prod(var.shape) < min_size:
            continue
        want = expected_spec(var.get_metadata()["out_sharding"], preset)
        have = var.get_value().sharding
        expect = NamedSharding(have.mesh, want)
        if not have.is_equivalent_to(expect, len(var.shape)):
            problems.append(f"{path}: sharded {have.spec}, preset {preset!r} says {want}")
    return problems


def _logical_params(state):
    """(path, variable) for each leaf Variable that carries logical axis names."""
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding"):
            yield jax.tree_util.keystr(path, simple=True, separator="/"), var
