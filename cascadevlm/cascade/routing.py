"""Routing from records now lives in :mod:`cascadevlm.gating.routing` (below both ``cascade/`` and ``report/``).

This module re-exports it so code written against ``cascadevlm.cascade.routing`` keeps working.
"""

from cascadevlm.gating.routing import *  # noqa: F403
from cascadevlm.gating.routing import CANDIDATE_RULES, FUSION_GRID, GATES, entropy_of, sent_outcome
from cascadevlm.gating.routing import __all__ as _public

__all__ = [*_public, "CANDIDATE_RULES", "FUSION_GRID", "GATES", "entropy_of", "sent_outcome"]
