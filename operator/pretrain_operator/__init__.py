"""The control plane: the PretrainJob API, the planning core and its backends."""

__version__ = "0.1.0"
