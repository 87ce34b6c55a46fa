"""The optimizers that the contract tests (tests/optim/test_contract.py) run over.

One line per optimizer: ``Entry(name, cls, kwargs, zero_kwargs)``. ``cls(params, base, **kwargs,
**base_kwargs)`` builds it; ``zero_kwargs`` are the radii that make it its base optimizer bit for
bit. Per-domain optimizers (``cls.per_domain``) are stepped with ``[closure]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flatlab.optim import GAM, SAM, SAMGAM
from flatlab.optim.dgsam import DGSAM
from flatlab.optim.sagm import SAGM
from flatlab.optim.variants import GSAM, WSAM, FriendlySAM, LookSAM


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    zero_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, params: Any, base: Any, *, zero: bool = False, **extra: Any) -> Any:
        kwargs = {**self.kwargs, **(self.zero_kwargs if zero else {}), **extra}
        return self.cls(params, base, **kwargs)


REGISTRY: list[Entry] = [
    Entry("sam", SAM, {"rho": 0.05}, {"rho": 0.0}),
    Entry("asam", SAM, {"rho": 0.5, "adaptive": True}, {"rho": 0.0}),
    Entry("usam", SAM, {"rho": 0.05, "normalize": False}, {"rho": 0.0}),
    Entry(
        "gam_fd",
        GAM,
        {"rho": 0.1, "fd_rho": 0.02},
        {"rho": 0.0, "fd_rho": 0.0, "gamma": 0.0, "alpha": 1.0},
    ),
    Entry("gam_exact", GAM, {"rho": 0.1, "hvp": "exact"}, {"rho": 0.0}),
    Entry("samgam", SAMGAM, {"rho": 0.1, "sam_rho": 0.05}, {"rho": 0.0, "sam_rho": 0.0}),
    Entry("gsam", GSAM, {"rho": 0.05, "alpha": 0.4}, {"rho": 0.0}),
    Entry("wsam", WSAM, {"rho": 0.05, "gamma": 0.9}, {"rho": 0.0}),
    Entry("wsam_coupled", WSAM, {"rho": 0.05, "gamma": 0.7, "decouple": False}, {"rho": 0.0}),
    # k=1 keeps closure_calls constant; k > 1 is tested in tests/optim/test_variants.py
    Entry("looksam", LookSAM, {"rho": 0.05, "k": 1}, {"rho": 0.0}),
    Entry("fsam", FriendlySAM, {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9},
          {"rho": 0.0, "sigma": 0.0}),
    # per-domain methods, stepped with one domain ([closure])
    Entry("dgsam", DGSAM, {"rho": 0.05, "combine": "perturbed_mean"}, {"rho": 0.0}),
    Entry("sagm", SAGM, {"rho": 0.05, "alpha": 1e-3}, {"rho": 0.0, "alpha": 0.0}),
]


def step(opt: Any, closure: Any) -> Any:
    """Step any registered optimizer with one closure (a one-domain list when per-domain)."""
    return opt.step([closure] if getattr(opt, "per_domain", False) else closure)
