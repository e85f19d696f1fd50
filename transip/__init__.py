"""TransIP: a Transformer interatomic potential that learns rotational equivariance (arXiv 2510.00027)."""

__version__ = "0.1.0"

from . import native  # noqa: E402,F401  (loads the native ops library when it was built)
