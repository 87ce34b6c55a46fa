"""flatlab.sde: stochastic differential equations of optimizers, simulated and validated.

Compagnoni et al., "Adaptive Methods through the Lens of SDEs", ICLR 2025 (arXiv 2411.15958);
Li, Tai & E, "Stochastic Modified Equations" (arXiv 1511.06251). See docs/sde.md.

=========================  ==================================================================
module                     what
=========================  ==================================================================
``noise``                  ``GaussianNoise`` (diagonal / full), ``StudentTNoise``, ``Sigma/B``
``objectives``             ``Quadratic``, ``FunctionObjective``, ``NetworkObjective``
``models``                 ``SGDSDE`` (order 1/2), ``SignSGDSDE``, ``RMSpropWSDE``, ``AdamWSDE``
``integrate``              ``simulate`` (batched Euler-Maruyama), ``Trajectory``
``compare``                ``compare``, ``run_optimizer``, ``optimizer_for``
``laws``                   stationary losses, SignSGD phases, ``scaling_rule``
``targets``                the reproduction targets T1-T6 run by ``flatlab run sde``
=========================  ==================================================================
"""

from flatlab.sde import laws
from flatlab.sde.compare import Comparison, compare, optimizer_for, run_optimizer
from flatlab.sde.integrate import (
    Trajectory,
    default_statistics,
    grouped_loss_statistics,
    simulate,
)
from flatlab.sde.malladi import MalladiAdamSDE, MalladiRMSpropSDE
from flatlab.sde.models import SGDSDE, AdamWSDE, OptimizerSDE, RMSpropWSDE, SignSGDSDE
from flatlab.sde.noise import GaussianNoise, StudentTNoise, student_t_sign_mean
from flatlab.sde.objectives import FunctionObjective, NetworkObjective, Objective, Quadratic

__all__ = [
    "MalladiAdamSDE", "MalladiRMSpropSDE",
    "SGDSDE",
    "AdamWSDE",
    "Comparison",
    "FunctionObjective",
    "GaussianNoise",
    "NetworkObjective",
    "Objective",
    "OptimizerSDE",
    "Quadratic",
    "RMSpropWSDE",
    "SignSGDSDE",
    "StudentTNoise",
    "Trajectory",
    "compare",
    "default_statistics",
    "grouped_loss_statistics",
    "laws",
    "optimizer_for",
    "run_optimizer",
    "simulate",
    "student_t_sign_mean",
]
