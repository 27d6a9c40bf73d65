"""Checkpoints: orbax CheckpointManager holding the train state and the data-iterator state.

One checkpoint = {state: params, opt_state, step, rng} (sharded arrays, StandardSave) +
{data: the grain iterator state} (JSON). Saves are asynchronous; orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save leaves no step that
`latest_step()` would return: a resumed run restarts from the last *complete* checkpoint.
Export and evaluation read only a subtree of `state` (`restore_subtree`: the encoder's
parameters).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mlcd import tree_utils


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int | None = None, *, read_only: bool = False):
        """keep: how many checkpoints to keep. read_only: for export / evaluation, which must
        never create, clean up or write anything in a run's checkpoint directory."""
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoints in {workdir} (expected {self.directory})")
        options = (
            ocp.CheckpointManagerOptions(read_only=True)
            if read_only
            else ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any]) -> None:
        """Starts an asynchronous save; `wait()` before relying on it being on disk."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
        )

    def restore(self, step: int, target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores onto `target`: a tree of jax.ShapeDtypeStruct with concrete shardings.

        Passing the target (never relying on saved shardings) is what lets a run resume on a
        different mesh or device count. A checkpoint whose arrays differ from the target's
        (another model or objective) is refused first, naming the differing arrays.
        """
        self._check_matches(step, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.data

    def restore_subtree(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """Restores only the leaves of `target`, a subtree of the saved train state (e.g.
        {'params': the encoder's parameters}), onto the ShapeDtypeStructs' shardings.

        Nothing else is read: not the optimizer state, step, rng, the data-iterator state, nor
        parameters `target` leaves out (orbax's partial restore: PyTreeRestore with
        partial_restore=True reads the leaves of `item` and skips the rest of the checkpoint).
        Raises naming the first leaf of `target` the checkpoint does not hold (orbax would
        return such a leaf unrestored, as its ShapeDtypeStruct). For read_only Checkpointers:
        one that has saved has bound `state` to StandardSave's handler, which orbax then
        refuses to pair with PyTreeRestore.
        """
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        ).state
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                raise ValueError(
                    f"checkpoint {step} in {self.directory} has no {tree_utils.path_str(path)!r} "
                    "(a checkpoint from a different model?)"
                )
        return restored

    def _check_matches(self, step: int, target: dict[str, Any]) -> None:
        """ValueError naming the first arrays that differ in path or shape between checkpoint
        `step` and `target` (orbax would report the whole tree, or restore mismatched shapes)."""
        saved = ocp.StandardCheckpointer().metadata(
            os.path.join(self.directory, str(step), "state")
        )
        shapes = lambda tree: {
            tree_utils.path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }
        on_disk, here = shapes(saved.item_metadata), shapes(target)
        diff = [
            f"{k}: {on_disk.get(k, 'absent')} on disk, {here.get(k, 'absent')} in this run"
            # Parameters first: they say more than their optimizer moments.
            for k in sorted(set(on_disk) | set(here), key=lambda k: (k[:7] != "params/", k))
            if on_disk.get(k) != here.get(k)
        ]
        if diff:
            raise ValueError(
                f"checkpoint {step} in {self.directory} was written for another train state "
                f"({len(diff)} arrays differ; {'; '.join(diff[:3])}). Resume with the config "
                "(model, objective) that wrote it, or train in a new workdir. (Before the "
                "objectives owned their heads, MLCD runs kept their centers at params/centers; "
                "export and evaluate still read such runs.)"
            )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` placed with `shardings` (a matching tree of shardings)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
