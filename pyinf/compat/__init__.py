"""Drop-in APIs of other influence libraries, computed with pyinf.

* :mod:`pyinf.compat.datainf`: ``IFEngine`` and ``IFEngineGeneration`` of the
  DataInf research code (Kwon et al., ICLR 2024). Needs pandas for
  ``IFEngineGeneration.compute_IF`` (``pip install pyinf[compat]``).
"""
from .datainf import IFEngine, IFEngineGeneration

__all__ = ["IFEngine", "IFEngineGeneration"]
