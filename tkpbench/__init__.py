"""tkpbench: a reproducibility suite for TKP-PCL (Top-K Pooling with Patch Contrastive Learning).

One file per component of the paper: ``encoder``, ``hv_bilstm``, ``pooling``, ``pce``,
``model`` (Eq. 1, 2, 6), ``data``, ``train``, ``pseudo``, ``crf``, ``metrics``, ``deeplab``,
``segment`` and ``report``.
"""

__version__ = "0.1.0"
