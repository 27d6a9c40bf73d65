"""The jitted train step: objective forward + loss -> gradients (optionally accumulated over
microbatches) -> optax update.

`build_train_step(config, mesh)` is the one place that assembles it, shared by the trainer,
bench/dry_run.py (which lowers it on the abstract state for a fake mesh) and the tests.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mlcd import objectives, optim, sharding, train_state
from mlcd.checkpoint import abstract_like
from mlcd.objectives import Objective


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: dict[str, Any],
    mesh: jax.sharding.Mesh,
    microbatches: int = 1,
):
    """Jitted (state, batch) -> (state, metrics); the input state's buffers are donated.

    The batch (objective.inputs, dim 0 split over every device) goes through
    objective.forward on the model rebuilt from params (without the heads), then
    objective.loss with params['heads'].

    microbatches = k > 1 computes the gradient in k sequential slices of the batch (a lax.scan
    accumulating the sum), so activations take 1/k of the memory for the same update. Only for
    objectives whose loss is a mean of per-example terms (`objective.per_example`: all slices
    share the step's rng, hence e.g. MLCD's sampled negatives): the loss and gradient are then
    the full batch's. In-batch contrastive losses are refused: a slice would see only B/k
    negatives.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = sharding.batch_sharding(mesh)
    if microbatches > 1 and not objective.per_example:
        raise ValueError(
            f"config.microbatches={microbatches}: objective {type(objective).__name__} compares "
            "examples across the batch, so a microbatch would change its loss; use 1"
        )

    def grads_of(params, batch, step_rng):
        def loss_fn(params):
            model = nnx.merge(graphdef, train_state.model_params(params))
            out = objective.forward(model, batch)
            return objective.loss(out, params.get(train_state.HEADS, {}), batch, step_rng)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def accumulated_grads_of(params, batch, step_rng):
        # Microbatch j = rows j, j + k, j + 2k, ...: every device keeps B / (k N) of its own
        # rows in each slice, so splitting moves no data.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(-1, microbatches, *x.shape[1:]), 0, 1), batch
        )

        def body(total, mb):
            value, grads = grads_of(params, mb, step_rng)
            # Gradients summed in the parameters' own layout (FSDP: reduce-scattered per slice).
            grads = jax.lax.with_sharding_constraint(grads, state_shardings["params"])
            return jax.tree.map(jnp.add, total, (value, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, first, step_rng))
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / microbatches, total)

    def step_fn(state, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        compute = grads_of if microbatches == 1 else accumulated_grads_of
        (loss, aux), grads = compute(state["params"], batch, step_rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss, gradient or updated parameter (divergence, e.g. too high a
        # learning rate) leaves params and optimizer state as they were: the state stays
        # finite, so no checkpoint is ever non-finite. The step and rng still advance (the data
        # and schedule stay aligned); the trainer counts these steps and stops after
        # config.nonfinite.max_consecutive of them in a row. A select is exact: finite steps
        # are unchanged to the bit.
        finite = (
            jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        )
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": jax.random.key_data(rng),
        }
        metrics = {
            "train/loss": loss,
            "train/lr": schedule(state["step"]),
            "train/grad_norm": grad_norm,
            "train/nonfinite": 1.0 - finite.astype(jnp.float32),
            **{f"train/{k}": v for k, v in aux.items()},
        }
        return new_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


class TrainStep(NamedTuple):
    """A train step, jitted but not yet compiled, and the pieces it was built from."""

    objective: Objective  # objectives.build(config), unless one was passed in
    graphdef: nnx.GraphDef  # the model's structure; nnx.merge(graphdef, params) rebuilds it
    tx: optax.GradientTransformation  # optim.make_optimizer(config.optim, ...)
    shardings: dict[str, Any]  # NamedShardings of the train state (state_shardings)
    abstract_state: dict[str, Any]  # ShapeDtypeStructs of the train state, with `shardings`
    step: Any  # jitted (state, batch) -> (state, metrics), state donated (make_train_step)


def build_train_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    microbatches: int | None = None,
    objective: Objective | None = None,
) -> TrainStep:
    """The train step of `config` on `mesh`, built from shapes only: allocates nothing.

    objectives.build(config) -> train_state.abstract_params (model + heads) -> shardings
    (heads' own, then config.sharding_rules) -> optim.make_optimizer (heads' lr multipliers,
    then config.optim.lr_mults) -> state_shardings -> make_train_step.

    Args:
      config: a resolved config (train_state.resolve_model_config).
      mesh: the device mesh the state and batch are sharded over (sharding.make_mesh).
      microbatches: gradient-accumulation slices; None: config.microbatches.
      objective: the method; None: objectives.build(config).

    Returns:
      TrainStep. Nothing is traced or compiled yet: jax.jit compiles `step` on its first call
      or `.lower`; call or lower it under jax.set_mesh(mesh). Create the real state with
      train_state.init_state(config, built.objective, built.tx, built.shardings).

    Raises:
      ValueError: microbatches > 1 with an objective that compares examples across the batch.
    """
    if microbatches is None:
        microbatches = config.microbatches
    if objective is None:
        objective = objectives.build(config)
    graphdef, params = train_state.abstract_params(config, objective)
    param_shardings = train_state.param_shardings(config, objective, params, mesh)
    tx, schedule = optim.make_optimizer(
        config.optim, params, config.total_steps, train_state.lr_mult_rules(objective)
    )
    shardings = train_state.state_shardings(tx, params, param_shardings, mesh)
    step = make_train_step(graphdef, objective, tx, schedule, shardings, mesh, microbatches)
    return TrainStep(
        objective=objective,
        graphdef=graphdef,
        tx=tx,
        shardings=shardings,
        abstract_state=abstract_like(train_state.abstract_state(tx, params), shardings),
        step=step,
    )
