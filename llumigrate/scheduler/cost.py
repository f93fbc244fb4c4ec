"""`MigrationCostModel`: what moving a request costs, learnt from migrations.

    seconds(num_tokens) ~= fixed_s + per_token_s * num_tokens

fit by weighted least squares over the observed migrations (older ones
decayed by `decay` per new one) plus a prior worth `prior_weight`
observations, so the estimate is sane before any migration and follows the
measurements after a few. The model is immutable: `observe` returns a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llumigrate.errors import ConfigError
from llumigrate.scheduler.snapshot import RequestSnapshot

_Stats = tuple[float, float, float, float, float]  # sum w, wx, wy, wxx, wxy


@dataclass(frozen=True)
class MigrationCostModel:
    """Estimated seconds to migrate a request of N context tokens.

    Invariants: estimates are >= 0 and never decrease with N (both fitted
    coefficients are clamped at 0), so ordering by estimate orders by
    context length when nothing else differs.
    """

    prior_fixed_s: float = 0.05
    prior_per_token_s: float = 2e-5
    prior_weight: float = 1.0
    prior_ref_tokens: int = 2048     # where the prior's second pseudo-point sits
    decay: float = 0.98
    stats: _Stats = (0.0, 0.0, 0.0, 0.0, 0.0)
    num_observed: int = 0

    def __post_init__(self) -> None:
        for name in ("prior_fixed_s", "prior_per_token_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.prior_weight > 0 and self.prior_ref_tokens > 0):
            raise ConfigError("prior_weight and prior_ref_tokens must be > 0, got "
                              f"{self.prior_weight}, {self.prior_ref_tokens}")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {self.decay}")

    def observe(self, num_tokens: int, seconds: float) -> MigrationCostModel:
        """The model after one measured migration of `num_tokens` tokens."""
        assert num_tokens >= 0 and seconds >= 0
        x, y = float(num_tokens), float(seconds)
        w, wx, wy, wxx, wxy = (v * self.decay for v in self.stats)
        stats = (w + 1.0, wx + x, wy + y, wxx + x * x, wxy + x * y)
        return replace(self, stats=stats, num_observed=self.num_observed + 1)

    def coefficients(self) -> tuple[float, float]:
        """(fixed_s, per_token_s) of the current fit."""
        w, ref = self.prior_weight / 2, float(self.prior_ref_tokens)
        y_ref = self.prior_fixed_s + self.prior_per_token_s * ref
        prior = (2 * w, w * ref, w * (self.prior_fixed_s + y_ref), w * ref * ref, w * ref * y_ref)
        s, sx, sy, sxx, sxy = (p + v for p, v in zip(prior, self.stats))
        slope = max(0.0, (s * sxy - sx * sy) / (s * sxx - sx * sx))
        return max(0.0, (sy - slope * sx) / s), slope

    def estimate(self, num_tokens: int) -> float:
        fixed, per_token = self.coefficients()
        return fixed + per_token * num_tokens

    def cost(self, req: RequestSnapshot) -> float:
        """Estimated seconds to migrate `req` (its whole context moves)."""
        return self.estimate(req.num_tokens)
