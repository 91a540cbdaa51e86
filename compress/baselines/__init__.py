"""Reducers by name. Feature reducers share the call shape ``fn(x (n, d), num_keep, layout=None) -> Reduction``."""

from compress.baselines.random import random_reduce
from compress.baselines.sample import sample_reduce
from compress.baselines.spatial import spatial_reduce

FEATURE_REDUCERS = {
    "random": random_reduce,
    "sample": sample_reduce,
    "spatial": spatial_reduce,
}
