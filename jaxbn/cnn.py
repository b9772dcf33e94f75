"""A convolutional network with batch normalization after every convolution.

Each block is ``activation(BN(conv(h)))``: the convolution has no bias when batch
norm follows it (batch norm's ``bias`` takes its place), and an optional pooling
comes after the activation. Global average pooling over the spatial axes and a
dense layer give the logits. Without batch norm every convolution has a bias.

The convolutions run through :func:`conv`, a ``jax.custom_vjp`` around
``lax.conv_general_dilated`` whose backward pass is written as two forward
convolutions in the canonical layout (input ``[N, *spatial, C]``, kernel
``[*spatial, in, out]``). JAX's own transpose rule emits the two gradient
convolutions with permuted dimension numbers; XLA on the CPU rewrites such
convolutions into the canonical form (which its fast convolution library runs)
only in the entry computation of a program, not inside the body of a loop, so in
a ``lax.scan`` training loop autodiff's gradient convolutions fall back to a
naive loop nest, many times slower than the same step jitted alone
(``benchmarks/bench_cnn.py --conv-diagnostic`` measures it). The canonical
backward runs at the same speed in both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks, _core, _model
from jaxbn._checks import AxisName
from jaxbn.act import ACTIVATIONS
from jaxbn.fold import fold_into_conv
from jaxbn.layer import BatchNorm

__all__ = ["CNN", "DATA_FORMATS", "POOLINGS", "conv"]

Params = dict[str, Any]
State = dict[str, Any]

#: The layouts of the CNN's activations: batch first, channels last or second.
DATA_FORMATS = ("NHWC", "NCHW")
#: The pooling a block may end with (2x2 window, stride 2, no padding).
POOLINGS = ("max", "avg")

_SPATIAL = "DHW"


def _channels_last_dims(num_spatial: int) -> tuple[str, str, str]:
    """Canonical dimension numbers: ``N...C`` input and output, ``...IO`` kernel."""
    spatial = _SPATIAL[-num_spatial:]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_channels_last(x, kernel, strides, padding):
    """``lax.conv_general_dilated`` on ``[N, *spatial, C]`` with ``[*spatial, in, out]``."""
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_channels_last_dims(x.ndim - 2)
    )


def _conv_fwd(x, kernel, strides, padding):
    # Residuals: the two operands, each needed for the other's gradient.
    return _conv_channels_last(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
    """The gradients of the convolution, as two canonical forward convolutions.

    Along one spatial axis, with ``x`` padded by ``(lo, hi)``, stride ``s`` and a
    kernel of size ``k``::

        y[n, o, j] = sum_{t, i} x_pad[n, s * o + t, i] * kernel[t, i, j]

    so that, with ``r = (size + lo + hi - k) mod s`` the rows the forward drops:

    - ``dx[n, p, i] = sum_{o, t: s*o + t = p + lo} dy[n, o, j] kernel[t, i, j]``:
      a convolution of ``dy`` dilated by ``s`` (``lhs_dilation``) with the kernel
      flipped along its spatial axes and its ``in``/``out`` axes swapped, padded
      by ``(k - 1 - lo, k - 1 - hi + r)``;
    - ``dkernel[t, i, j] = sum_{n, o} x_pad[n, s * o + t, i] dy[n, o, j]``: a
      convolution of ``x`` with ``dy`` as the kernel, in which ``i`` plays the
      batch and ``n`` the input channel: ``x`` as ``[in, *spatial, N]``, ``dy``
      as ``[*out_spatial, N, out]`` dilated by ``s`` (``rhs_dilation``), padded
      by ``(lo, hi - r)``; the ``[in, *k, out]`` result is transposed back.

    Both are written in the canonical layout, with the transposes explicit, so
    XLA runs them with its fast convolution kernels wherever they are compiled.
    """
    x, kernel = residuals
    nd = x.ndim - 2
    dims = _channels_last_dims(nd)
    ksize, size = kernel.shape[:nd], x.shape[1:-1]
    dropped = [
        (n + lo + hi - k) % s
        for n, (lo, hi), k, s in zip(size, padding, ksize, strides, strict=True)
    ]
    spatial = tuple(range(1, nd + 1))
    # Two ties order the backward so that at most x, dy and two transposed
    # copies are alive beside what earlier layers keep. Each is arithmetic
    # (v + 0 * w[0, ..., 0], exact for a finite w), since XLA:CPU drops an
    # optimization_barrier before it schedules.
    # 1. The transposed copy of x depends on x alone: XLA is otherwise free to
    #    make it right after the forward and keep it, x-sized, until the backward
    #    reaches this layer, so that every block holds its input twice (measured
    #    on the CNN of ``benchmarks/bench_fused.py --model cnn``, where it undid
    #    the saving of batch norm fused with its activation). Tied to dy, the
    #    copy is made in the backward.
    # 2. dx is computed after dkernel (dy tied to dkernel): dkernel's two
    #    transposed copies are then freed before dx is written.
    zero = jnp.zeros((), x.dtype)
    x_t = jnp.transpose(x + zero * dy[(0,) * dy.ndim].astype(x.dtype), (nd + 1, *spatial, 0))
    dy_t = jnp.transpose(dy, (*spatial, 0, nd + 1))  # [*out_spatial, N, out]; x_t [in, *spatial, N]
    dkernel_t = lax.conv_general_dilated(
        x_t,
        dy_t,
        (1,) * nd,
        [(lo, hi - r) for (lo, hi), r in zip(padding, dropped, strict=True)],
        rhs_dilation=strides,
        dimension_numbers=dims,
    )  # [in, *ksize, out]
    flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(nd))), -1, -2)
    dx = lax.conv_general_dilated(
        dy + zero.astype(dy.dtype) * dkernel_t[(0,) * dkernel_t.ndim].astype(dy.dtype),
        flipped,
        (1,) * nd,
        [
            (k - 1 - lo, k - 1 - hi + r)
            for k, (lo, hi), r in zip(ksize, padding, dropped, strict=True)
        ],
        lhs_dilation=strides,
        dimension_numbers=dims,
    )
    dkernel = jnp.transpose(dkernel_t, (*spatial, 0, nd + 1))
    return _like(dx, x), _like(dkernel, kernel)


def _like(cotangent, primal):
    """``cotangent`` in ``primal``'s dtype, all-reduced over the mesh axes it alone varies on.

    Inside ``shard_map`` a kernel replicated over the devices meets a batch
    split over them; its cotangent must be replicated too: the sum of every
    device's contribution (what JAX's own transpose of the implicit broadcast
    gives).
    """
    extra = tuple(sorted(_core.varying(cotangent) - _core.varying(primal)))
    return _core.psum_over(cotangent, extra).astype(primal.dtype)


_conv_channels_last.defvjp(_conv_fwd, _conv_bwd)


def _pairs(name: str, value, nd: int) -> tuple[int, ...]:
    """An int or a tuple of ``nd`` positive ints, as a tuple."""
    values = (value,) * nd if isinstance(value, (int, np.integer)) else value
    if (
        not isinstance(values, tuple)
        or len(values) != nd
        or any(not _checks.is_int(v) or v < 1 for v in values)
    ):
        raise ValueError(f"{name} must be a positive int or a tuple of {nd} of them, got {value!r}")
    return tuple(int(v) for v in values)


def conv(
    x: ArrayLike,
    kernel: ArrayLike,
    *,
    strides: int | tuple[int, ...] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    data_format: str = "NHWC",
) -> jax.Array:
    """A convolution whose gradient compiles to fast kernels inside loops too.

    The same numbers as ``lax.conv_general_dilated(x, kernel, strides, padding,
    dimension_numbers=(data_format, "HWIO", data_format))``, with a hand-written
    backward made of two canonical convolutions (see the module docstring for
    why: inside ``lax.scan`` XLA:CPU runs autodiff's gradient convolutions with
    a naive loop nest). ``"NCHW"`` input is transposed to channels-last around
    the convolution; forward-mode differentiation is not available.

    Args:
        x: ``[batch, height, width, in]`` (``"NHWC"``) or
            ``[batch, in, height, width]`` (``"NCHW"``).
        kernel: ``[kh, kw, in, out]`` (HWIO, as Flax's ``nn.Conv``).
        strides: the stride, one int or one per spatial axis.
        padding: ``"SAME"``, ``"VALID"`` or one ``(low, high)`` pair per
            spatial axis.
        data_format: ``"NHWC"`` or ``"NCHW"``.

    Returns:
        ``[batch, out_height, out_width, out]`` (or channels second for
        ``"NCHW"``), in the dtype of ``x`` and ``kernel``.

    Raises:
        ValueError, TypeError: on mismatched shapes or bad options, or a kernel
            larger than the (padded) image.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxbn.cnn import conv
        >>> conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5))).shape
        (1, 4, 4, 5)
        >>> conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5)), strides=2)[0, :, :, 0]
        Array([[18., 12.], [12.,  8.]], dtype=float32)
    """
    x, kernel, strides, padding = _conv_args(x, kernel, strides, padding, data_format)
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    y = _conv_channels_last(x.astype(dtype), kernel.astype(dtype), strides, padding)
    return jnp.moveaxis(y, -1, 1) if data_format == "NCHW" else y


def _conv_args(x, kernel, strides, padding, data_format):
    """Checks :func:`conv`'s arguments; returns them channels-last, with explicit padding."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    for name, v in (("x", x), ("kernel", kernel)):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating-point dtype, got {v.dtype}")
    if x.ndim < 3 or kernel.ndim != x.ndim:
        raise ValueError(
            f"x must be [batch, *spatial, channels] ({data_format}) and kernel "
            f"[*spatial, in, out] of the same rank (at least 3); got x {x.shape}, "
            f"kernel {kernel.shape}"
        )
    nd = x.ndim - 2
    if data_format == "NCHW":
        x = jnp.moveaxis(x, 1, -1)
    if x.shape[-1] != kernel.shape[-2]:
        raise ValueError(
            f"kernel {kernel.shape} expects {kernel.shape[-2]} input channels "
            f"([*spatial, in, out]), but x has {x.shape[-1]} ({data_format})"
        )
    strides = _pairs("strides", strides, nd)
    size, ksize = x.shape[1:-1], kernel.shape[:nd]
    pads = padding
    if isinstance(padding, str) and padding in ("SAME", "VALID"):
        pads = lax.padtype_to_pads(size, ksize, strides, padding)
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    except (TypeError, ValueError):
        pads = ()
    if len(pads) != nd:
        raise ValueError(
            f'padding must be "SAME", "VALID" or {nd} (low, high) pairs, got {padding!r}'
        )
    if any(n + lo + hi < k for n, k, (lo, hi) in zip(size, ksize, pads, strict=True)):
        # No output position: an empty forward, and a backward that fails.
        raise ValueError(
            f"the kernel's spatial size {ksize} exceeds the image's {size} padded by "
            f"{pads}: the convolution has no output (pad the image, or use a smaller "
            f"kernel or padding='SAME')"
        )
    return x, kernel, strides, pads


def _pool(h, kind: str, spatial: tuple[int, ...]):
    """2x2 pooling with stride 2 and no padding over the ``spatial`` axes of ``h``."""
    window = tuple(2 if a in spatial else 1 for a in range(h.ndim))
    # NumPy init values stay concrete under jax.checkpoint, where JAX recognizes
    # the max and sum windows (and their derivatives) only for constant inits.
    if kind == "max":
        init = np.array(-np.inf, h.dtype)
        return lax.reduce_window(h, init, lax.max, window, window, "VALID")
    total = lax.reduce_window(h, np.array(0, h.dtype), lax.add, window, window, "VALID")
    return total / math.prod(window)


@dataclasses.dataclass(frozen=True)
class CNN:
    """A convolutional network with batch norm before each block's nonlinearity.

    For block ``i`` (``0 <= i < len(channels)``)::

        z_i = conv(h_i, kernel_i, stride_i)      ("SAME" padding; no bias with batch norm)
        u_i = BN_i(z_i)                          (or z_i + bias_i without batch norm)
        h_{i+1} = pool_i(activation(u_i))        (pool_i: none, or 2x2 max/avg, stride 2)

    and then ``logits = mean_{spatial}(h) @ kernel + bias`` (global average
    pooling and a dense head).

    Layout of ``params, state = cnn.init(key)``::

        params["blocks"][i]["conv"]["kernel"]        [kh, kw, in, out]  (HWIO)
        params["blocks"][i]["conv"]["bias"]          [out]  without batch norm only
        params["blocks"][i]["batch_norm"]["scale"]   [out]  with batch norm
        params["blocks"][i]["batch_norm"]["bias"]    [out]
        params["head"]["kernel"]                     [channels[-1], num_classes]
        params["head"]["bias"]                       [num_classes]
        state["blocks"][i]["batch_norm"]["mean"]     [out]  running statistics
        state["blocks"][i]["batch_norm"]["var"]      [out]

    ``state["blocks"][i]`` is an empty dict without batch norm. Kernels are HWIO
    whatever the ``data_format`` (as Flax's ``nn.Conv``).

    Attributes:
        in_channels: channels of the input images.
        channels: output channels of each block, a tuple of positive ints.
        num_classes: outputs of the dense head.
        kernel_size: the convolutions' window, an int or ``(kh, kw)``.
        strides: the convolutions' stride: an int for every block, or a tuple
            with one entry (an int or ``(sh, sw)``) per block.
        pooling: ``None``, ``"max"`` or ``"avg"`` after every block, or a tuple
            with one of them per block.
        activation: name of the nonlinearity, a key of
            :data:`jaxbn.act.ACTIVATIONS` (``"relu"``, ``"leaky_relu"``,
            ``"elu"``, ...).
        use_batch_norm: put a :class:`jaxbn.BatchNorm` after each convolution.
        momentum: running-statistics momentum of the batch-norm layers.
        eps: batch norm's ``eps``.
        axis_name: named axis to synchronize batch statistics over (inside
            ``shard_map``/``pmap``), or ``None``.
        param_dtype: dtype of the params and state.
        remat: recompute each block in the backward pass instead of keeping its
            intermediates (``jax.checkpoint`` per block).
        data_format: ``"NHWC"`` (channels last, batch norm on ``axis=-1``) or
            ``"NCHW"`` (channels second, batch norm on ``axis=1``).
        init_stddev: standard deviation of the Gaussian initial kernels;
            ``None`` (default) uses ``1 / sqrt(fan_in)`` (LeCun normal, with
            ``fan_in = kh * kw * in``). Biases start at 0.
        debias: zero-debiased running averages in every batch-norm layer (see
            :class:`jaxbn.BatchNorm`; the state then counts updates in ``"count"``).
        frozen: batch-norm layers normalize with their running statistics in
            training too and leave them unchanged (see :class:`jaxbn.BatchNorm`).
        fuse_activation: run every block's batch norm fused with its activation
            (:func:`jaxbn.batch_norm_act`, In-Place ABN): the backward keeps only
            each block's activated output, for less activation memory. Needs
            batch norm and an invertible ``activation`` (``"leaky_relu"``,
            ``"elu"``, ``"identity"``); batch norm's scale is then
            ``|scale| + eps`` (see :func:`jaxbn.act.effective_scale`). The params
            and state have the same layout as without it.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxbn.cnn import CNN
        >>> cnn = CNN(in_channels=1, channels=(4, 8), num_classes=3)
        >>> params, state = cnn.init(jax.random.key(0))
        >>> params["blocks"][1]["conv"]["kernel"].shape
        (3, 3, 4, 8)
        >>> logits, state = cnn.apply(params, state, jnp.ones((2, 8, 8, 1)), training=True)
        >>> logits.shape
        (2, 3)
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)
    num_classes: int = 10
    kernel_size: int | tuple[int, int] = 3
    strides: int | tuple[int | tuple[int, int], ...] = 1
    pooling: str | tuple[str | None, ...] | None = None
    activation: str = "relu"
    use_batch_norm: bool = True
    momentum: float = 0.99
    eps: float = 1e-5
    axis_name: AxisName = None
    param_dtype: Any = jnp.float32
    remat: bool = False
    data_format: str = "NHWC"
    init_stddev: float | None = None
    debias: bool = False
    frozen: bool = False
    fuse_activation: bool = False

    def __post_init__(self):
        for name in ("in_channels", "num_classes"):
            _checks.check_positive_int(name, getattr(self, name))
        _model.check_sizes("channels", self.channels, 1, "one positive int")
        _pairs("kernel_size", self.kernel_size, 2)
        self._block_specs  # noqa: B018 (checks strides and pooling)
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}")
        _model.check_config(self)

    @functools.cached_property
    def _block_specs(self) -> tuple[tuple[tuple[int, int], str | None], ...]:
        """Each block's ``(strides, pooling)``, checked."""
        n = len(self.channels)
        strides = self.strides
        if _checks.is_int(strides):
            strides = (_pairs("strides", strides, 2),) * n
        elif not isinstance(strides, tuple) or len(strides) != n:
            raise ValueError(
                f"strides must be an int or a tuple of {n} entries (one per block), "
                f"got {self.strides!r}"
            )
        pooling = self.pooling if isinstance(self.pooling, tuple) else (self.pooling,) * n
        if len(pooling) != n or any(p is not None and p not in POOLINGS for p in pooling):
            raise ValueError(
                f"pooling must be None, 'max', 'avg' or a tuple of {n} of them (one per "
                f"block), got {self.pooling!r}"
            )
        strides = [_pairs(f"strides[{i}]", s, 2) for i, s in enumerate(strides)]
        return tuple(zip(strides, pooling, strict=True))

    @functools.cached_property
    def _batch_norms(self) -> tuple[BatchNorm | None, ...]:
        """Each block's batch norm (``None`` without batch norm)."""
        if not self.use_batch_norm:
            return (None,) * len(self.channels)
        return tuple(_model.batch_norm(self, c, axis=self.channel_axis) for c in self.channels)

    @functools.cached_property
    def _variable_shapes(self) -> tuple[dict, dict]:
        """The shapes :meth:`init` gives, computed once (see :func:`_model.check_variables`)."""
        return _model.variable_shapes(self)

    @property
    def channel_axis(self) -> int:
        """The channel axis of the activations: ``-1`` (NHWC) or ``1`` (NCHW)."""
        return -1 if self.data_format == "NHWC" else 1

    @property
    def _spatial_axes(self) -> tuple[int, int]:
        return (1, 2) if self.data_format == "NHWC" else (2, 3)

    def init(self, key: jax.Array) -> tuple[Params, State]:
        """Returns fresh ``(params, state)`` in the layout of the class docstring.

        Args:
            key: a ``jax.random.key`` for the kernels.

        Returns:
            ``(params, state)``, nested dicts of arrays.
        """
        kernel_size = _pairs("kernel_size", self.kernel_size, 2)
        keys = jax.random.split(key, len(self.channels) + 1)
        blocks = [
            _model.init_layer(self, k, (*kernel_size, c_in, c_out), "conv", bn)
            for k, c_in, c_out, bn in zip(
                keys[:-1],
                (self.in_channels, *self.channels[:-1]),
                self.channels,
                self._batch_norms,
                strict=True,
            )
        ]
        head_shape = (self.channels[-1], self.num_classes)
        head = _model.init_layer(self, keys[-1], head_shape, "head", None)[0]["head"]
        return {"blocks": [p for p, _ in blocks], "head": head}, {"blocks": [s for _, s in blocks]}

    def apply(
        self, params: Params, state: State, x: ArrayLike, *, training: bool
    ) -> tuple[jax.Array, State]:
        """Runs the network; returns ``(logits, new_state)``.

        Args:
            params: from :meth:`init`.
            state: the running statistics, from :meth:`init` or a previous call.
            x: ``[batch, height, width, in_channels]`` images (``"NHWC"``) or
                ``[batch, in_channels, height, width]`` (``"NCHW"``).
            training: ``True``: batch norm uses the batch statistics and the
                running statistics are updated; ``False``: running statistics are
                used and ``state`` comes back unchanged.

        Returns:
            ``(logits, new_state)``: ``logits`` is ``[batch, num_classes]``,
            ``new_state`` has the layout of ``state`` (no gradient flows into it).

        Raises:
            ValueError, TypeError: (while tracing) for ``x`` of the wrong rank,
                layout or channel count, or params that do not match the config.
        """
        x = self._check(params, state, x, training)
        h, new_states = x, []
        for block, block_state, bn, (strides, pooling) in zip(
            params["blocks"], state["blocks"], self._batch_norms, self._block_specs, strict=True
        ):
            block_fn = self._block
            if self.remat:
                block_fn = jax.checkpoint(block_fn, static_argnums=(3, 4, 5, 6))
            h, new_block_state = block_fn(block, block_state, h, bn, training, strides, pooling)
            new_states.append(new_block_state)
        features = jnp.mean(h, axis=self._spatial_axes)
        head = params["head"]
        logits = features @ head["kernel"] + _core.expand(head["bias"], 2, (1,))
        return logits, {"blocks": new_states}

    def _check(self, params, state, x, training):
        """Checks the arguments of :meth:`apply` while tracing; returns ``x`` as an array."""
        _checks.check_training(training)
        x = jnp.asarray(x)
        fmt = self.data_format
        if x.ndim != 4 or x.shape[self.channel_axis] != self.in_channels:
            expected = (
                f"[batch, height, width, {self.in_channels}]"
                if fmt == "NHWC"
                else f"[batch, {self.in_channels}, height, width]"
            )
            hint = ""
            other_axis, other = (1, "NCHW") if fmt == "NHWC" else (-1, "NHWC")
            if x.ndim == 4 and x.shape[other_axis] == self.in_channels:
                hint = f" (that is the {other} layout: pass data_format={other!r})"
            raise ValueError(
                f"x must have shape {expected} for data_format={fmt!r} "
                f"(in_channels={self.in_channels}), got {x.shape}{hint}"
            )
        _checks.check_x(x)
        _model.check_variables(self, params, state, "blocks")
        self._check_spatial_size(x)
        return x

    def _check_spatial_size(self, x):
        """Refuses an image that the strides and pooling shrink to nothing.

        A block's "SAME" convolution leaves ``ceil(size / stride)`` positions,
        its 2x2 pooling ``size // 2``; at 0 the global average would be a mean
        over nothing: NaN logits, without an error.
        """
        height, width = size = tuple(x.shape[a] for a in self._spatial_axes)
        for i, (stride, pooling) in enumerate(self._block_specs):
            size = tuple(-(-n // s) for n, s in zip(size, stride, strict=True))
            if pooling is not None:
                size = tuple(n // 2 for n in size)
            if min(size) < 1:
                raise ValueError(
                    f"x's {height}x{width} images are too small for this CNN: after block "
                    f"{i} (strides={self.strides!r}, pooling={self.pooling!r}) nothing is "
                    f"left ({size[0]}x{size[1]}); use fewer blocks, smaller strides or less "
                    f"pooling"
                )

    def _block(self, block, block_state, h, bn, training, strides, pooling):
        """One block: ``(output, new_block_state)``."""
        z = conv(h, block["conv"]["kernel"], strides=strides, data_format=self.data_format)
        u, new_block_state = _model.normalize(
            block, block_state, z, bn, linear="conv", training=training, axis=self.channel_axis
        )
        # A fused batch norm has applied the activation itself.
        h = u if bn is not None and bn.fused else ACTIVATIONS[self.activation](u)
        if pooling is not None:
            h = _pool(h, pooling, self._spatial_axes)
        return h, new_block_state

    def fold(self, params: Params, state: State) -> tuple[CNN, Params, State]:
        """Folds every batch norm into its convolution, for inference.

        Each block's ``BN(conv(x, W))`` in evaluation mode is the convolution
        ``conv(x, W') + b'`` (see :func:`jaxbn.fold_into_conv`), so the folded
        network is the same CNN without batch norm, with outputs equal to
        ``apply(params, state, x, training=False)`` to within rounding. With
        ``fuse_activation`` the scale folded in is ``|scale| + eps``, the one the
        fused layer multiplies by.

        Args:
            params: trained params of this network.
            state: its running statistics.

        Returns:
            ``(model, params, state)`` of the folded network (``use_batch_norm``
            off; the state holds no statistics).
        """
        return _model.fold(self, params, state, key="blocks", linear="conv", fold_fn=fold_into_conv)
