"""Equinox adapter: see :mod:`jaxbn.frameworks.equinox` (needs ``jaxbn[equinox]``)."""

from jaxbn.frameworks.equinox import BatchNorm

__all__ = ["BatchNorm"]
