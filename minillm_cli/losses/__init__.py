"""Pure, tested loss functions: divergences, log-probs and the policy-gradient pieces (fp32 inside)."""
