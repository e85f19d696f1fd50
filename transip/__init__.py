"""TransIP: a Transformer interatomic potential that learns rotational equivariance (arXiv 2510.00027)."""

__version__ = "0.1.0"
