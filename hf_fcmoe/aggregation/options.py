"""Method names, their documented options with defaults, and option validation (see `AggregationHub`)."""

from __future__ import annotations

from hf_fcmoe.aggregation.robust import robust_defaults, validate_robust_options

METHODS = ("fcmoe", "fedavg", "fedprox", "fedadam", "fedyogi", "ties", "dare_ties", "fedgh", "fedmoe", "local")

_LOWRANK = {"lowrank": "factor"}
DEFAULTS: dict[str, dict] = {
    "fcmoe": {
        **_LOWRANK,
        "retention": True,
        "retention_lambda": 0.5,
        "importance": True,
        "kappa": 2.0,
        "projection": True,
        "leave_one_out": False,
        "conflict_space": "product",
        "conflict_granularity": "expert",
        "retention_target": "projected",
    },
    "fedavg": dict(_LOWRANK),
    "fedprox": {**_LOWRANK, "mu": 0.01},
    "fedadam": {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "ties": {"density": 0.2, "majority_sign_method": "total"},
    "dare_ties": {"density": 0.2, "majority_sign_method": "total", "seed": 0},
    "fedgh": dict(_LOWRANK),
    "fedmoe": dict(_LOWRANK),
    "local": {},
}
# Methods that ignore a client's delta on experts it routed no tokens to.
MASKED = {"fcmoe", "fedmoe", "fedgh", "ties", "dare_ties"}


def resolve_options(method: str, server_lr: float, options: dict) -> dict:
    """The method's defaults overridden by ``options``; TypeError for unknown names, ValueError for bad values."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; available: {', '.join(METHODS)}")
    allowed = {**DEFAULTS[method], **robust_defaults(method)}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) for method {method!r}: {unknown}; allowed: {sorted(allowed)}")
    opts = {**allowed, **options}
    if opts.get("lowrank", "factor") not in ("factor", "exact"):
        raise ValueError(f"lowrank must be 'factor' or 'exact', got {opts['lowrank']!r}")
    if "density" in opts and not 0 < opts["density"] <= 1:
        raise ValueError(f"density must be in (0, 1], got {opts['density']!r}")
    if opts.get("majority_sign_method", "total") not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {opts['majority_sign_method']!r}")
    if opts.get("conflict_space", "product") not in ("product", "factor"):
        raise ValueError(f"conflict_space must be 'product' or 'factor', got {opts['conflict_space']!r}")
    if opts.get("conflict_space") == "factor" and opts.get("lowrank") == "exact":
        raise ValueError("conflict_space 'factor' needs lowrank 'factor': exact mode always measures products")
    if opts.get("conflict_granularity", "expert") not in ("expert", "module"):
        raise ValueError(f"conflict_granularity must be 'expert' or 'module', got {opts['conflict_granularity']!r}")
    if opts.get("retention_target", "projected") not in ("projected", "deviation"):
        raise ValueError(f"retention_target must be 'projected' or 'deviation', got {opts['retention_target']!r}")
    if opts.get("retention_lambda", 0.0) < 0:
        raise ValueError(f"retention_lambda must be >= 0, got {opts['retention_lambda']!r}")
    if opts.get("kappa") is not None and opts.get("kappa", 1.0) <= 0:
        raise ValueError(f"kappa must be positive or None, got {opts['kappa']!r}")
    if not server_lr > 0:
        raise ValueError(f"server_lr must be positive, got {server_lr!r}")
    validate_robust_options(method, opts)
    return opts
