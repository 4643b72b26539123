"""jaxcpt: continual pretraining of LLMs in JAX."""
__version__ = "0.1.0"
