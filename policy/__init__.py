"""Phase 2 of framegate: train gating policies and baselines on cached features."""
