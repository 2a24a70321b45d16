"""Dynamic layer skipping: skip plans (pure, rank-consistent by construction) and the nested model view."""
from .plan import SkipPlan, num_skipped, parse_skip_ratios, sample_skip_plan, scheduled_ratio
from .schedule import SkipScheduler
from .view import decoder_layers, nested_view

__all__ = ["SkipPlan", "SkipScheduler", "decoder_layers", "nested_view", "num_skipped", "parse_skip_ratios",
           "sample_skip_plan", "scheduled_ratio"]
