"""flatlab.optim: optimizers that train toward flat minima, all behind one contract.

``loss = opt.step(closure)`` with a closure that zeroes grads, runs forward and backward and
returns the loss; ``opt.param_groups`` is the base optimizer's. See docs/optim.md.

=====================  =====================================================================
name                   what
=====================  =====================================================================
``SAM``                SAM / ASAM (``adaptive=True``) / USAM (``normalize=False``)
``GAM``, ``SAMGAM``    Gradient norm Aware Minimization (exact HVP or finite differences)
``GSAM``, ``WSAM``     surrogate-gap guided SAM; weighted-sharpness SAM
``LookSAM``            SAM gradient every k steps, its orthogonal part reused in between
``FriendlySAM``        SAM with the gradient EMA removed from the ascent
``DGSAM``, ``SAGM``    per-domain methods for domain generalization (one closure per domain)
``SignSGD``            SignSGD and signum (momentum), decoupled weight decay
``RMSpropW``           RMSprop with decoupled weight decay
``SharpnessAware``     the shell every sharpness-aware optimizer subclasses
schedules              ``Constant``, ``LinearWarmup``, ``CosineWarmup``, ``ProportionalToLR``
``edge_of_stability``  stability thresholds of GD, USAM and SAM (``flatlab.optim.stability``)
=====================  =====================================================================
"""

from flatlab.optim.base import (
    ClosureError,
    NonFiniteStep,
    SharpnessAware,
    TwoPass,
    frozen_norm_statistics,
)
from flatlab.optim.dgsam import DGSAM
from flatlab.optim.gam import GAM, SAMGAM
from flatlab.optim.sagm import SAGM
from flatlab.optim.sam import SAM
from flatlab.optim.schedules import (
    Constant,
    CosineWarmup,
    LinearWarmup,
    ProportionalToLR,
    Schedule,
)
from flatlab.optim.sign import RMSpropW, SignSGD
from flatlab.optim.stability import edge_of_stability
from flatlab.optim.variants import GSAM, WSAM, FriendlySAM, LookSAM

__all__ = [
    "DGSAM",
    "ClosureError",
    "TwoPass",
    "GAM",
    "GSAM",
    "WSAM",
    "FriendlySAM",
    "LookSAM",
    "SAGM",
    "SAM",
    "SAMGAM",
    "Constant",
    "CosineWarmup",
    "LinearWarmup",
    "NonFiniteStep",
    "ProportionalToLR",
    "RMSpropW",
    "Schedule",
    "SharpnessAware",
    "SignSGD",
    "edge_of_stability",
    "frozen_norm_statistics",
]
