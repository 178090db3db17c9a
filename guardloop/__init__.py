"""guardloop: a safety classifier that keeps learning from the traffic it guards."""

__version__ = "0.1.0"
