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

AXES = ("data", "fsdp", "seq", "tensor")  # slowest to fastest varying: tensor talks most
BATCH = ("data", "fsdp")  # the batch dimension of every input is split over these

_ACTIVATIONS = {
    "activation_batch": BATCH,
    "activation_length": "seq",  # size 1 unless context parallelism is on
    "activation_embed": None,
    "activation_head_dim": None,
}
_REPLICATED = {name: None for name in
               ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "length",
                "layers")}  # layers: the stacked axis of model.scan_layers, never split

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
    its gradient stays split as the table is. Otherwise, rows come from a replicated copy (a
    lookup into a table split on both axes makes XLA rematerialise it anyway, with a warning).
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = spmd.get_logical_axis_rules() and dict(spmd.get_logical_axis_rules()).get("vocab")
    axes = axes_of(axes or None)
    ways = 1 if mesh.empty else math.prod(mesh.shape[a] for a in axes)
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


def without_axis(rules_pairs, axis: str) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Logical axis rules with mesh axis `axis` taken out of every mapping: the rules inside a
    shard_map that is manual over `axis`, where each device already holds its own slice."""
    def drop(mapped):
        kept = tuple(a for a in axes_of(mapped) if a != axis)
        return kept[0] if len(kept) == 1 else kept or None

    return tuple((name, drop(mapped)) for name, mapped in rules_pairs)


def shard_optimizer_state(shardings, abstract_state, mesh: jax.sharding.Mesh):
    """The train state's shardings with every optimizer-state leaf also split over 'data'."""
    def place(path, x, s):
        if "opt_state" not in jax.tree_util.keystr(path):
            return s
        return NamedSharding(mesh, over_data(s.spec, x.shape, dict(mesh.shape)))

    return jax.tree_util.tree_map_with_path(place, abstract_state, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH))


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into one global array split over the batch axes."""
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
