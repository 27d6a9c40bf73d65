"""Mesh construction, partition rules, the batch layout, and the optimizer from config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from mlcd import optim, sharding


def test_mesh_fills_minus_one():
    mesh = sharding.make_mesh((("data", -1), ("model", 2)))
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert mesh.size == jax.device_count() == 8


@pytest.mark.parametrize(
    "axes", [(("data", 3), ("model", -1)), (("data", 4), ("model", 4)), (("a", -1), ("b", -1))]
)
def test_bad_mesh_names_config_key(axes):
    with pytest.raises(ValueError, match=r"config\.mesh="):
        sharding.make_mesh(axes)


def test_batch_size_must_divide_devices():
    mesh = sharding.make_mesh((("data", -1),))
    with pytest.raises(
        ValueError, match=r"config\.batch_size=12 is not divisible by the 8 devices"
    ):
        sharding.check_batch_divisible(12, mesh, "config.batch_size")
    assert sharding.check_batch_divisible(16, mesh, "config.batch_size") == 2


def test_partition_rules_first_match_wins():
    mesh = sharding.make_mesh((("data", 4), ("model", 2)))
    params = {
        "image": {"proj": {"kernel": jnp.zeros((16, 6))}, "norm": {"scale": jnp.zeros((6,))}},
        "text": {"embed": jnp.zeros((10, 8))},
        "t": jnp.zeros(()),
    }
    rules = (
        (r"image/proj/kernel", (None, "model")),
        (r"text/.*", "fsdp"),
        (r".*", "replicate"),
    )
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(params, rules, mesh))
    assert specs["image"]["proj"]["kernel"] == P(None, "model")
    # fsdp: the largest dim that 'data' (4) divides; 10 is not divisible, 8 is.
    assert specs["text"]["embed"] == P(None, "data")
    assert specs["image"]["norm"]["scale"] == P()
    assert specs["t"] == P()


def test_partition_rule_errors():
    mesh = sharding.make_mesh((("data", 4), ("model", 2)))
    with pytest.raises(ValueError, match="no rule matches parameter 'w'"):
        sharding.param_shardings({"w": jnp.zeros((4,))}, ((r"x", "replicate"),), mesh)
    with pytest.raises(ValueError, match="does not divide w"):
        sharding.param_shardings({"w": jnp.zeros((3, 4))}, ((r".*", ("data", None)),), mesh)


def test_host_to_global_shards_over_all_devices():
    mesh = sharding.make_mesh((("data", 2), ("model", 4)))
    x = np.arange(16 * 3).reshape(16, 3)
    g = sharding.host_to_global({"x": x}, mesh)["x"]
    assert g.sharding.spec == P(("data", "model"))
    assert len(g.addressable_shards) == 8
    assert all(s.data.shape == (2, 3) for s in g.addressable_shards)
    np.testing.assert_array_equal(np.asarray(g), x)


def _optim_cfg(**kw):
    c = common.base_config().optim
    c.update(kw)
    return c


def test_schedule_warmup_then_cosine():
    cfg = _optim_cfg(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    s = optim.make_schedule(cfg, total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    # halfway through the decay: r + (1 - r) * (1 + cos(pi/2)) / 2 = 0.55
    np.testing.assert_allclose(float(s(60)), 0.55, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)


def test_weight_decay_mask_and_lr_multipliers():
    params = {
        "image": {"fc": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}},
        "norm": {"scale": jnp.ones((3,))},
        "centers": jnp.ones((4, 3)),
        "t": jnp.ones(()),
    }
    mask = optim.decay_mask(params, common.base_config().optim.no_decay)
    assert mask == {
        "image": {"fc": {"kernel": True, "bias": False}},
        "norm": {"scale": False},
        "centers": True,
        "t": False,
    }
    mults = optim.lr_multipliers(params, (("centers", 10.0), ("image/.*", 0.0)))
    assert mults["centers"] == 10.0 and mults["image"]["fc"]["kernel"] == 0.0 and mults["t"] == 1.0


def test_optimizer_matches_optax_adamw_and_applies_multipliers():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,)), "c": jnp.ones((2, 2))}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    cfg = _optim_cfg(
        lr=0.1, warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.0, lr_mults=(("c", 2.0),)
    )
    tx, sched = optim.make_optimizer(cfg, params, total_steps=10)
    ref = optax.adamw(
        sched,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=0.1,
        mask={"w": True, "b": False, "c": True},
    )
    upd, _ = tx.update(grads, tx.init(params), params)
    ref_upd, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(upd["w"], ref_upd["w"], rtol=1e-6)
    np.testing.assert_allclose(upd["b"], ref_upd["b"], rtol=1e-6)
    np.testing.assert_allclose(upd["c"], 2.0 * ref_upd["c"], rtol=1e-6)


def test_gradient_clipping_is_applied_before_adam():
    # With a large eps Adam is not scale-invariant, so clipping changes the update: the
    # configured optimizer on g must equal the unclipped optimizer on g * (1 / ||g||).
    params = {"w": jnp.zeros((4,))}
    g = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # norm 5
    kw = dict(lr=1.0, warmup_steps=0, weight_decay=0.0, eps=1.0)
    tx, _ = optim.make_optimizer(_optim_cfg(grad_clip_norm=1.0, **kw), params, total_steps=10)
    ref, _ = optim.make_optimizer(_optim_cfg(grad_clip_norm=0.0, **kw), params, total_steps=10)
    upd, _ = tx.update(g, tx.init(params), params)
    ref_upd, _ = ref.update(jax.tree.map(lambda x: x / 5.0, g), ref.init(params), params)
    np.testing.assert_allclose(upd["w"], ref_upd["w"], rtol=1e-6)
    unclipped, _ = ref.update(g, ref.init(params), params)
    assert not np.allclose(upd["w"], unclipped["w"])
