"""Argument checks shared by every public entry point: one vocabulary, used everywhere.

These functions only look at shapes, dtypes and Python values, so every error is
raised while a function is traced, before anything runs. A public entry validates
once, here, and the code below it trusts what it gets: :func:`op_args` checks the
op's arguments and returns their canonical form (:class:`OpArgs`: feature axes,
the mask at ``x``'s rank, ``axis_name`` as a tuple), which :mod:`jaxbn.ops`,
:mod:`jaxbn.act` and :mod:`jaxbn.reference` take as they are. Nothing here holds a
formula of batch normalization: the custom op and the reference both call these
checks without sharing any of the arithmetic that the tests compare. The one
count kept here, :func:`feature_counts` (the values a mask keeps per feature),
serves the checks and the op and layer built on them; the reference counts on
its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

AxisArg = int | Sequence[int]
AxisName = str | tuple[str, ...] | None


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (a ``bool`` is not one)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, *, minimum: int = 1, or_none: bool = False) -> None:
    """Raises ``ValueError`` unless ``value`` is an int ``>= minimum`` (see :func:`is_int`).

    With ``or_none``, ``None`` is accepted too (and the message says so).
    """
    if or_none and value is None:
        return
    if not is_int(value) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}{' or None' if or_none else ''}, got {value!r}")


def check_positive_or_none(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is ``None`` or a number ``> 0``."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be None or > 0, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_training(training: Any) -> None:
    """Raises ``TypeError`` unless ``training`` is a bool (a static mode, never traced)."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a Python bool (True or False), got {training!r}")


def check_python_float(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is a real Python or NumPy number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype batch norm computes in: float32 for low-precision inputs, else the input's.

    NumPy's promotion, which does not depend on JAX's promotion mode (under
    ``jax_numpy_dtype_promotion="strict"`` JAX refuses to mix float widths).
    """
    return np.promote_types(dtype, np.float32)


def feature_axes(ndim: int, axis: AxisArg) -> tuple[int, ...]:
    """Normalizes ``axis`` (an int or a sequence; negative allowed) to sorted axes.

    Raises:
        ValueError: if an axis is out of range for ``ndim`` or given twice.
        TypeError: if ``axis`` is not an int or a sequence of ints.
    """
    raw = (axis,) if isinstance(axis, (int, np.integer)) else axis
    try:
        raw = tuple(raw)
    except TypeError:
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}") from None
    if not raw:
        raise ValueError("axis must name at least one feature axis, got ()")
    out = []
    for a in raw:
        if not is_int(a):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for x of rank {ndim} (expected -{ndim} <= axis < {ndim})"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis has repeated entries: {axis!r} (rank {ndim})")
    return tuple(sorted(out))


def check_x(x: ArrayLike) -> None:
    """Checks that ``x`` is a floating-point array of rank at least 1."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"x must have a floating-point dtype, got {dtype}")
    if jnp.ndim(x) == 0:
        raise ValueError("x must have rank >= 1 (a batch of values), got a scalar")


def check_eps(eps: float, dtype: Any = jnp.float32) -> None:
    """Checks that ``eps`` is a positive, finite, normal Python number (a static value).

    ``dtype`` is the compute dtype (float32 or wider): an ``eps`` below its
    smallest normal number is flushed to zero by XLA on the CPU, so a constant
    feature would give NaN, as with ``eps = 0``.
    """
    check_python_float("eps", eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps}")
    tiny = float(jnp.finfo(compute_dtype(dtype)).tiny)
    if eps < tiny:
        raise ValueError(
            f"eps must be a normal number in the compute dtype "
            f"{compute_dtype(dtype)} (>= {tiny:.4g}; smaller "
            f"values are flushed to zero), got {eps}"
        )


def check_hashable_fields(config: Any) -> None:
    """Refuses a field that makes a frozen config unhashable (a list, a dict, an array).

    Configs are static arguments of ``jax.jit``, which hashes them; a list
    would be accepted at construction and fail far from its cause.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"{type(config).__name__}.{f.name} must be hashable (a tuple, not a list; "
                f"Python scalars, not arrays), got {value!r}"
            ) from None


def check_axis_name(axis_name: Any) -> None:
    """Checks that ``axis_name`` is ``None``, a name (str) or a tuple of names."""
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if axis_name is not None and (not names or not all(isinstance(n, str) for n in names)):
        raise TypeError(
            f"axis_name must be None, a str or a tuple of str (named mapped axes), "
            f"got {axis_name!r}"
        )


def check_feature_vector(name: str, v: ArrayLike | None, shape: tuple[int, ...]):
    """Checks that a per-feature array (scale, bias, mean, var) has ``shape``."""
    if v is None:
        return
    if jnp.shape(v) != shape:
        raise ValueError(
            f"{name} must have shape {shape} (the feature axes of x), got {jnp.shape(v)}"
        )
    if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {jnp.result_type(v)}")


def check_mask(mask: ArrayLike | None, x_shape: tuple[int, ...], feat: tuple[int, ...]):
    """Checks ``mask`` and returns it with ``x``'s rank, broadcastable to ``x`` (or ``None``).

    Two layouts are accepted, told apart by the mask's rank:

    - ``x``'s rank: broadcastable to ``x`` by NumPy's rules (Flax's convention),
      ``[N, 1]`` or ``[N, C]`` for ``[N, C]``; where the mask varies along the
      feature axes, each feature gets its own count;
    - the rank of ``x`` without its feature axes: one axis per reduction axis,
      in order (``[N]`` for ``[N, C]``; ``[N, H, W]`` or ``[N, 1, 1]`` for
      NHWC), the same for every feature.

    A scalar mask is accepted too. Any other rank is refused: aligned from the
    right, a per-example mask ``[N]`` on NCHW input would mask along ``W``.

    Returns:
        The mask as an array of ``x``'s rank: size 1 on the feature axes where
        it does not vary along them.
    """
    if mask is None:
        return None
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got {jnp.result_type(mask)}")
    given = tuple(jnp.shape(mask))
    red_shape = reduce_shape(x_shape, feat)
    # A concrete mask stays concrete (NumPy), so its counts can be checked.
    xp = jnp if isinstance(mask, jax.core.Tracer) else np
    mask = xp.asarray(mask)
    if len(given) == len(red_shape) != len(x_shape):
        mask = xp.expand_dims(mask, feat)
    elif not given:
        mask = xp.reshape(mask, (1,) * len(x_shape))
    if mask.ndim != len(x_shape) or any(
        m not in (1, d) for m, d in zip(mask.shape, x_shape, strict=True)
    ):
        raise ValueError(
            f"mask must broadcast to x's shape {x_shape} with x's rank (Flax's "
            f"convention), or have one axis per reduction axis, broadcasting to "
            f"{red_shape} (the rank of x without its feature axes); got "
            f"{given} for x of shape {x_shape}"
        )
    return mask


def mask_over_batch(mask: Any, x_shape: tuple[int, ...], feat: tuple[int, ...], xp: Any = jnp):
    """``mask`` (as :func:`check_mask` returns it) broadcast to ``x``'s reduction axes.

    The result has ``x``'s shape on the reduction axes and the mask's own size
    (1, or the feature's size) on the feature axes ``feat``. ``xp`` is ``jnp``
    or ``np`` (a concrete mask, counted while tracing).
    """
    shape = tuple(mask.shape[a] if a in feat else d for a, d in enumerate(x_shape))
    return xp.broadcast_to(mask, shape)


def feature_counts(
    mask: Any,
    x_shape: tuple[int, ...],
    feat: tuple[int, ...],
    *,
    dtype: Any = None,
    keepdims: bool = False,
    xp: Any = jnp,
):
    """The number of values of each feature that enter the batch statistics (local, no named axis).

    Without a mask: every value of the reduction axes, a scalar. With ``mask``
    (as :func:`check_mask` returns it): the kept ones, summed over the
    reduction axes, one count per feature where the mask varies along the
    feature axes (size 1 there otherwise); ``keepdims`` keeps ``x``'s rank.
    ``xp`` is ``jnp`` or ``np``.
    """
    red = tuple(a for a in range(len(x_shape)) if a not in feat)
    if mask is None:
        return xp.asarray(math.prod(x_shape[a] for a in red), dtype)
    kept = mask_over_batch(mask, x_shape, feat, xp)
    return xp.sum(kept, axis=red, keepdims=keepdims, dtype=dtype)


def check_batch(
    x_shape: tuple[int, ...], feat: tuple[int, ...], axis_name: AxisName, mask: Any
) -> None:
    """Refuses training statistics over a single value per feature.

    With one value the variance is zero and the output is ``bias`` whatever the
    input: always a bug. A named axis can make the count differ from the local
    shape, and a traced mask is unknown while tracing, so the check is made only
    where the count is known here: without a named axis, and with no mask or a
    concrete one (as :func:`check_mask` returns it), which must not keep exactly
    one value of any feature (keeping none gives statistics of zero).
    """
    if axis_name or isinstance(mask, jax.core.Tracer):
        return
    red = tuple(a for a in range(len(x_shape)) if a not in feat)
    where = f"x of shape {x_shape} with reduction axes {red}"
    counts = feature_counts(None if mask is None else np.asarray(mask), x_shape, feat, xp=np)
    if mask is None and counts <= 1:
        raise ValueError(f"expected more than 1 value per feature in training, got {where}")
    if mask is not None and np.any(counts == 1):
        raise ValueError(
            f"expected more than 1 value per feature in training, got a mask keeping 1 "
            f"value of some feature ({where})"
        )


def reduce_shape(x_shape: tuple[int, ...], feat: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``x`` with its feature axes removed."""
    return tuple(d for i, d in enumerate(x_shape) if i not in feat)


def axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
    """``axis_name`` as a tuple of names (``()`` for ``None``)."""
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


class OpArgs(NamedTuple):
    """The op's arguments in canonical form: what every function below a public entry takes.

    Attributes:
        x: the input, an array.
        scale: ``[features]`` array or ``None``.
        bias: ``[features]`` array or ``None``.
        mask: the mask at ``x``'s rank (as :func:`check_mask` returns it) or ``None``.
        feat: the feature axes, sorted and non-negative.
        eps: a Python float (``None`` where the caller takes none).
        axis_name: the named axes, a tuple (``()`` for none).
    """

    x: jax.Array
    scale: jax.Array | None
    bias: jax.Array | None
    mask: Any
    feat: tuple[int, ...]
    eps: float | None
    axis_name: tuple[str, ...]


def op_args(x, scale, bias, *, axis, eps, axis_name=None, mask=None, training=True) -> OpArgs:
    """Checks the op's arguments, while tracing, and returns them in canonical form.

    ``eps=None`` skips its check (for a caller without one); ``training=False``
    skips the refusal of a batch of one value per feature (:func:`check_batch`).
    """
    check_x(x)
    if eps is not None:
        check_eps(eps, jnp.result_type(x))
    check_axis_name(axis_name)
    axis_name = axis_tuple(axis_name)
    x = jnp.asarray(x)
    feat = feature_axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feat)
    check_feature_vector("scale", scale, fshape)
    check_feature_vector("bias", bias, fshape)
    mask = check_mask(mask, x.shape, feat)
    if training:
        check_batch(x.shape, feat, axis_name, mask)
    scale, bias = (None if v is None else jnp.asarray(v) for v in (scale, bias))
    eps = None if eps is None else float(eps)
    return OpArgs(x, scale, bias, mask, feat, eps, axis_name)


def check_keys(name: str, tree: Any, allowed: tuple[str, ...], required: tuple[str, ...]):
    """Checks that ``tree`` is a dict holding ``required`` keys and no others than ``allowed``."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(tree).__name__}")
    extra = sorted(set(tree) - set(allowed))
    if extra:
        raise ValueError(f"{name} may only hold the keys {list(allowed)}, got extra keys {extra}")
    missing = [k for k in required if k not in tree]
    if missing:
        raise ValueError(f"{name} must hold the keys {list(required)}, missing {missing}")


def check_backward(res, kind, fwd, cotangents, *, out, names, axis, **given) -> tuple:
    """Checks what a public backward is given against the forward's residuals.

    Args:
        res: the residuals; must be a ``kind``.
        kind: the residuals' dataclass, with the feature axes in ``axes`` and each
            name of ``given`` as a field.
        fwd: the name of the forward that returns them (for the message).
        cotangents: ``(d_out, dmean, dvar)`` as given.
        out: the field of ``res`` whose shape ``d_out`` must have (``"x"``, ``"z"``).
        names: the three cotangents' names, for the messages.
        axis: ``None`` or the forward's feature axis or axes.
        **given: the other keywords, each ``None`` or the forward's (``axis_name``
            compared as a tuple).

    Returns:
        ``tuple(cotangents)``.

    Raises:
        TypeError: if ``res`` is not a ``kind``, ``cotangents`` not a triple or a
            cotangent not floating.
        ValueError: if a keyword differs from the forward's or a cotangent has the
            wrong shape (the message names it).
    """
    if not isinstance(res, kind):
        raise TypeError(
            f"res must be the {kind.__name__} returned by {fwd}, got {type(res).__name__}"
        )
    shape, feat = getattr(res, out).shape, res.axes
    if axis is not None and feature_axes(len(shape), axis) != feat:
        raise ValueError(
            f"axis={axis!r} differs from the forward's feature axes {feat} ({out} of shape "
            f"{shape}): pass the forward's axis, or None"
        )
    for name, value in given.items():
        same = (axis_tuple(value) if name == "axis_name" else value) == getattr(res, name)
        if value is not None and not same:
            raise ValueError(
                f"{name}={value!r} differs from the forward's {name}="
                f"{getattr(res, name)!r}: pass the forward's, or None"
            )
    if not isinstance(cotangents, (tuple, list)) or len(cotangents) != 3:
        raise TypeError(
            f"cotangents must be a triple ({', '.join(names)}), got {type(cotangents).__name__}"
            + (f" of length {len(cotangents)}" if isinstance(cotangents, (tuple, list)) else "")
        )
    fshape = tuple(shape[a] for a in feat)
    for name, ct, want in zip(names, cotangents, (shape, fshape, fshape), strict=True):
        if jnp.shape(ct) != want:
            what = f"{out}'s shape" if want is shape else f"the feature shape (axes {feat})"
            raise ValueError(f"{name} must have {what} {want}, got {jnp.shape(ct)}")
        if not jnp.issubdtype(jnp.result_type(ct), jnp.floating):
            raise TypeError(f"{name} must have a floating-point dtype, got {jnp.result_type(ct)}")
    return tuple(cotangents)
