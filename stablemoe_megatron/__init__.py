"""stablemoe-megatron: a Megatron-Core trainer for Mixture-of-Experts language models.

Importing the package is cheap: megatron-core, and everything built on it, is imported by the
submodules that need it (``stablemoe_megatron.moe``, ``.model``, ``.training`` ...).
"""

__version__ = "0.1.0"
