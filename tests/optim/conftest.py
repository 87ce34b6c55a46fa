"""Tests of flatlab.optim run single-threaded: the models are tiny, and on a shared 2-core
machine intra-op threads only contend (a 1 ms step took 95 ms with the default threads)."""

import torch

torch.set_num_threads(1)
