"""Monte Carlo studies run as Ray tasks (coverage of confidence intervals)."""
