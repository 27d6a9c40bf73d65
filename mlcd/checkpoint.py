"""Checkpoints: orbax CheckpointManager holding the train state and the data-iterator state.

One checkpoint = {state: params, opt_state, step, rng} (sharded arrays, StandardSave) +
{data: the grain iterator state} (JSON) + {checksums: one per array and one of data} (JSON).
Saves are asynchronous; orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves no step that `latest_step()` would return. Files damaged
after that (a bad disk, a truncated copy) are another matter: orbax reads a truncated array file
with hundreds of tracebacks, and a flipped byte in an array's data without any error at all (its
chunks carry no checksum), hence the checksums, verified on every restore. `restore_latest`
resumes from the newest checkpoint that restores and moves the damaged ones aside. Export and
evaluation read only a subtree of `state` (`restore_subtree`: the encoder's parameters), whose
checksums are verified the same way.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mlcd import tree_utils


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int | None = None, *, read_only: bool = False):
        """keep: how many checkpoints to keep. read_only: for export / evaluation, which must
        never create, clean up or write anything in a run's checkpoint directory."""
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._read_only = read_only
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
        """Starts an asynchronous save; `wait()` before relying on it being on disk. The
        checksums are computed first, from the arrays in memory."""
        checksums = {"state": _state_checksums(state), "data": _data_checksum(data_state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                checksums=ocp.args.JsonSave(checksums),
            ),
        )

    def restore(self, step: int, target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores onto `target`: a tree of jax.ShapeDtypeStruct with concrete shardings.

        Passing the target (never relying on saved shardings) is what lets a run resume on a
        different mesh or device count. A checkpoint whose arrays differ from the target's
        (another model or objective) is refused first, naming the differing arrays; one whose
        files are damaged raises whatever orbax raises, or a ValueError naming the step
        directory (unreadable metadata, an array or the data state unlike what was saved).
        """
        self._check_matches(step, self._saved_shapes(step), target)
        return self._restore_verified(step, target)

    def restore_latest(
        self, target: dict[str, Any]
    ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """(step, state, data_state) of the newest checkpoint that restores onto `target` (as
        `restore`); None if there is no checkpoint.

        A step that cannot be restored (any error while reading it: damaged or missing files,
        an empty or partial step directory, an array unlike its checksum) is skipped for the
        next older one, so a damaged checkpoint costs the steps since the previous one, not the
        run. Once a step restores, each newer one that did not is moved aside to
        `<step>.corrupt` (kept for inspection, never deleted; orbax neither lists nor
        garbage-collects it, and the run saves that step number again) with one warning naming
        it and the reason; a read_only Checkpointer leaves it in place. A checkpoint of another
        train state is a configuration error, raised at once: older ones of the run would be no
        better. When no step restores, a ValueError names the directory and every step tried,
        and nothing is moved (an unreadable disk would otherwise empty the run).
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        failed: list[tuple[int, str]] = []
        with _QuietFailedReads() as quiet:
            for step in steps:
                # Only the reason is kept: the exception's frames hold orbax's pending reads.
                reason = None
                try:
                    saved = self._saved_shapes(step)
                except Exception as e:
                    reason = _first_line(e)
                else:
                    self._check_matches(step, saved, target)
                    try:
                        state, data_state = self._restore_verified(step, target)
                    except Exception as e:
                        reason = _first_line(e)
                # Every process resumes from the same step, even if only one could not read its
                # shards of a checkpoint.
                if _on_every_process(reason is None):
                    break
                failed.append((step, reason or "unreadable on another process"))
                quiet.failed()
            else:
                tried = "; ".join(f"{step}: {reason}" for step, reason in failed)
                raise ValueError(f"no checkpoint in {self.directory} restores ({tried})")
        self._move_aside(failed, step)
        return step, state, data_state

    def _move_aside(self, failed: list[tuple[int, str]], resumed: int) -> None:
        """Renames the step directories of `failed` (newer than `resumed`) to `<step>.corrupt`
        (`.corrupt.1`, ... if taken), so that orbax forgets them: left in place, the newest
        would stay `latest_step()`, and orbax skips saves of steps up to the latest."""
        for step, reason in failed:
            step_dir = self._step_dir(step)
            if self._read_only:
                where = "left in place (read-only)"
            elif jax.process_index() == 0:
                aside, n = f"{step_dir}.corrupt", 0
                while os.path.lexists(aside):
                    n += 1
                    aside = f"{step_dir}.corrupt.{n}"
                os.rename(step_dir, aside)
                where = f"moved to {aside}"
            else:
                continue  # process 0 moves it and says so
            logging.warning(
                "checkpoint %s cannot be restored (%s); %s, resuming from step %d",
                step_dir,
                reason,
                where,
                resumed,
            )
        if failed and not self._read_only:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("mlcd: damaged checkpoints moved aside")
            self._manager.reload()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _restore_verified(
        self, step: int, target: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """orbax's restore of step `step`, then its checksums compared with the restored arrays
        and data state (checkpoints written before there were checksums are taken as read)."""
        items = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
        has_checksums = self._has_checksums(step)
        if has_checksums:
            items["checksums"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if has_checksums:
            self._verify(step, restored.checksums, restored.state, restored.data)
        return restored.state, restored.data

    def _has_checksums(self, step: int) -> bool:
        """Whether checkpoint `step` carries checksums (those written before they existed do
        not, and are taken as read)."""
        return os.path.isdir(os.path.join(self._step_dir(step), "checksums"))

    def _verify(
        self,
        step: int,
        saved: dict[str, Any],
        state: dict[str, Any],
        data_state: dict[str, Any] | None = None,
    ) -> None:
        """ValueError naming the step directory and the first arrays of `state` (the whole
        train state, or a subtree of it) whose checksum differs from the one saved with
        checkpoint `step`, or the data state's (when given)."""
        here = _state_checksums(state)
        differ = [k for k in sorted(here) if saved["state"].get(k) != here[k]]
        if data_state is not None:  # the whole state: the checksums item lists its arrays
            differ += ["the data state"] * (saved["data"] != _data_checksum(data_state))
            differ += ["the checksums item"] * (not differ and set(saved["state"]) != set(here))
        if differ:
            raise ValueError(
                f"{self._step_dir(step)}: {', '.join(differ[:3])} not as saved (checksum "
                "mismatch); its files are damaged"
            )

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{array path: shape} of checkpoint `step`, from its metadata. orbax returns no
        metadata, rather than raising, when it cannot read it: that is a ValueError here
        (compared with the target, it would pass for a checkpoint holding no arrays)."""
        state_dir = os.path.join(self._step_dir(step), "state")
        with ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.metadata(state_dir).item_metadata
        if saved is None:
            raise ValueError(f"{state_dir}: no readable array metadata (missing or damaged)")
        return tree_utils.shapes(saved)

    def restore_subtree(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """Restores only the leaves of `target`, a subtree of the saved train state (e.g.
        {'params': the encoder's parameters}), onto the ShapeDtypeStructs' shardings.

        Nothing else is read: not the optimizer state, step, rng, the data-iterator state, nor
        parameters `target` leaves out (orbax's partial restore: PyTreeRestore with
        partial_restore=True reads the leaves of `item` and skips the rest of the checkpoint).
        Raises naming the first leaf of `target` the checkpoint does not hold (orbax would
        return such a leaf unrestored, as its ShapeDtypeStruct), and, as `restore`, naming the
        step directory when a leaf read is not as saved (checksum mismatch). For read_only
        Checkpointers: one that has saved has bound `state` to StandardSave's handler, which
        orbax then refuses to pair with PyTreeRestore.
        """
        items = {
            "state": ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )
        }
        # The checksums of the leaves read are verified as restore() verifies all of them: a
        # flipped byte in an array file reads without any error from orbax.
        has_checksums = self._has_checksums(step)
        if has_checksums:
            items["checksums"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored.state)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                raise ValueError(
                    f"checkpoint {step} in {self.directory} has no {tree_utils.path_str(path)!r} "
                    "(a checkpoint from a different model?)"
                )
        if has_checksums:
            self._verify(step, restored.checksums, restored.state)
        return restored.state

    def _check_matches(
        self, step: int, on_disk: dict[str, tuple[int, ...]], target: dict[str, Any]
    ) -> None:
        """ValueError naming the first arrays that differ in path or shape between checkpoint
        `step` (`on_disk`: its `_saved_shapes`) and `target` (orbax would report the whole
        tree, or restore mismatched shapes)."""
        here = tree_utils.shapes(target)
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


def _mix(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 in which every output bit depends on
    every input bit."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


@jax.jit
def _leaf_checksums(tree: Any) -> Any:
    """One uint32 per leaf: the sum (mod 2**32) over its elements of mix(bits ^ mix(index)).

    Any change to one element changes the sum (mix is a bijection), and changes to several
    cancel with a probability of about 2**-32, whatever their bits or positions. Integer sums do not depend
    on the order of reduction, so the value is the same on any mesh or device count; it is
    computed where the arrays are (one pass over the state, no copy to the host).
    """

    def leaf(x: jax.Array) -> jax.Array:
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        # 8-byte types become two uint32 per element (a trailing dimension).
        uint = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
        bits = jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)
        # The row-major element index, built per dimension so that it is sharded like `bits`.
        index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
        for d in reversed(range(bits.ndim)):
            iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
            index, stride = index + iota * np.uint32(stride % 2**32), stride * bits.shape[d]
        return jnp.sum(_mix(bits ^ _mix(index)), dtype=jnp.uint32)

    return jax.tree.map(leaf, tree)


def _state_checksums(state: dict[str, Any]) -> dict[str, int]:
    """{array path: checksum} of a train state (`_leaf_checksums`)."""
    sums = jax.tree_util.tree_flatten_with_path(_leaf_checksums(state))[0]
    return {tree_utils.path_str(p): int(np.asarray(x.addressable_data(0))) for p, x in sums}


def _data_checksum(data_state: dict[str, Any]) -> int:
    """CRC-32 of the data state's JSON as JsonSave writes it (json.dumps), which json.dumps of
    what JsonRestore reads back reproduces (the same key order; int keys as their strings)."""
    return zlib.crc32(json.dumps(data_state).encode())


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _first_line(error: Exception) -> str:
    """The first line of the innermost cause of `error`: orbax wraps tensorstore's precise
    error ('OUT_OF_RANGE: Error reading "params.w/0.0" ...') in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return str(message).strip().split("\n")[0] or type(error).__name__


class _QuietFailedReads(contextlib.AbstractContextManager):
    """Drops the echoes of a failed orbax restore, so that a damaged checkpoint is one warning.

    orbax reads the arrays in coroutines on an asyncio event loop that it closes on the first
    error. The rest then echo it, each with a traceback (hundreds for a real train state): the
    tensorstore reads still in flight report 'RuntimeError: Event loop is closed' through
    sys.unraisablehook when they complete, the read coroutines re-raise the error when they are
    collected (unraisable too), and asyncio logs 'Task exception was never retrieved'. All three
    are dropped while this is entered. After a `failed()` attempt, exiting collects garbage and
    waits (at most 10 s) until 0.5 s pass without an echo, so that late ones are dropped too.
    """

    def __init__(self):
        self._failed, self._last_echo = False, 0.0

    def failed(self) -> None:
        self._failed, self._last_echo = True, time.monotonic()

    def __enter__(self) -> _QuietFailedReads:
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._hook
        logging.getLogger("asyncio").addFilter(self._filter)
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            deadline = time.monotonic() + 10
            while self._failed:
                gc.collect()
                if time.monotonic() > min(deadline, self._last_echo + 0.5):
                    break
                time.sleep(0.05)
        finally:
            sys.unraisablehook = self._previous_hook
            logging.getLogger("asyncio").removeFilter(self._filter)

    def _hook(self, unraisable: Any) -> None:
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and (
            "Event loop is closed" in str(unraisable.exc_value)
        )
        code = getattr(unraisable.object, "cr_code", None)
        orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if closed_loop or orbax_read:
            self._last_echo = time.monotonic()
        else:
            self._previous_hook(unraisable)

    def _filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" in record.getMessage():
            self._last_echo = time.monotonic()
            return False
        return True
