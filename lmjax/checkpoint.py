"""Orbax checkpoints of {train state, data-iterator position}, saved together.

Saving the iterator with the weights makes resume exact by construction (nanodo): the batch
after a restore is the one that would have come next. Restoring passes abstract targets that
carry the current mesh's shardings, so a checkpoint written on one mesh loads onto any other.
"""

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx


def manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep,
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, data_state: dict) -> None:
    """Start writing (asynchronously if configured); the train loop keeps going meanwhile."""
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        data=ocp.args.JsonSave(data_state)), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state: nnx.State,
            step: int | None = None) -> tuple[nnx.State, dict, int] | None:
    """The latest (or given) checkpoint laid out like `abstract_state`, or None if there is none."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    target = nnx.to_pure_dict(abstract_state)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill in
    nnx.replace_by_pure_dict(state, restored["state"])
    return state, restored["data"], step
