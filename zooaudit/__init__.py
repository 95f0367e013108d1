"""zooaudit: batch audits of neural-network model zoos.

The core library (this package) is plain Python and imports no Prefect; the
orchestration lives in the sibling packages ``tasks`` and ``flows``.
"""

__version__ = "0.1.0"
