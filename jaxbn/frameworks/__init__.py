"""Drop-in batch-norm modules for Flax NNX, Flax Linen and Equinox.

Each adapter has its framework's constructor, call, variable names and dtype
conventions, and computes with :class:`jaxbn.BatchNorm` underneath (so with
:func:`jaxbn.batch_norm`, the hand-written backward):

- :mod:`jaxbn.nnx` (``jaxbn.frameworks.nnx``): ``BatchNorm`` for ``flax.nnx``;
- :mod:`jaxbn.linen` (``jaxbn.frameworks.linen``): ``BatchNorm`` for
  ``flax.linen``, and the converters between Linen variables and configs and
  jaxbn's (also importable from :mod:`jaxbn.interop`);
- :mod:`jaxbn.equinox` (``jaxbn.frameworks.equinox``): ``BatchNorm`` for
  Equinox, in the place of ``eqx.nn.BatchNorm(mode="batch")``.

The frameworks are optional extras (``pip install "jaxbn[flax]"``,
``pip install "jaxbn[equinox]"``). Nothing here is imported by ``import
jaxbn``; importing an adapter without its framework raises an ``ImportError``
that names the extra.
"""

__all__: list[str] = []  # the adapters are the submodules
