"""jaxopt_lab: profile, tune, compress and train JAX/Flax models, every technique a pure function."""

__version__ = "0.1.0"
