"""A reproducible, tracked training workflow for MNIST-family classifiers.

The pipeline, one module per stage:  dataset (download) -> train -> evaluate -> report,
plus `compare`, which reads the tracking store across hosts. Nothing happens at import time.
"""

__version__ = "0.1.0"
