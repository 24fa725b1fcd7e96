"""Sampling: KV-cached teacher-mixed rollouts, lockstep or speculative (`rollout`), and the cached models."""
