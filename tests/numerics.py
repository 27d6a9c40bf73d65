"""Numerical references shared by the loss tests: central finite differences and logsumexp.

The loss tests compare jax values and gradients against float64 NumPy implementations of the
formulas; these helpers differentiate such a reference numerically (a float64 loss is smooth
enough that h = 1e-6 gives ~1e-9 accurate central differences).
"""

import math

import numpy as np


def finite_differences(fn, args, coords, h=1e-6):
    """Central differences of fn(*args) at coords; float64 [len(coords)].

    Args:
      fn: a scalar function of the arrays `args` (a NumPy reference).
      args: its arguments; each is copied as a float64 array (scalars become 0-d arrays), so the
        callers' arrays are never modified.
      coords: a list of (arg index, index into that arg); () indexes a scalar.
      h: the step.
    """
    args = [np.array(a, np.float64) for a in args]
    out = []
    for which, idx in coords:
        a = args[which]
        orig = a[idx]
        a[idx] = orig + h
        up = fn(*args)
        a[idx] = orig - h
        down = fn(*args)
        a[idx] = orig
        out.append((up - down) / (2 * h))
    return np.array(out)


def finite_difference_grads(fn, args, h=1e-6):
    """Central differences of fn(*args) w.r.t. every entry of every arg.

    Returns:
      A list of float64 arrays, one per arg and of its shape (0-d for a scalar).
    """
    shapes = [np.shape(a) for a in args]
    coords = [(k, idx) for k, shape in enumerate(shapes) for idx in np.ndindex(shape)]
    flat = finite_differences(fn, args, coords, h)
    grads, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        grads.append(flat[start : start + size].reshape(shape))
        start += size
    return grads


def np_logsumexp(z):
    """log(sum(exp(z))) of a non-empty 1-D array or list of numbers, computed stably."""
    z = np.asarray(z)
    top = z.max()
    return top + np.log(np.exp(z - top).sum())
