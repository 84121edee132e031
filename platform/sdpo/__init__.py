"""sdpo: stepwise preference alignment (sDPO and the DPO family) of language models on Ray.

Importing the package is cheap and does not import Ray: data normalisation, partitioning, losses,
log-prob computation and planning all run without it.
"""

__version__ = "0.1.0"
