"""What happened and what to check: reports, progress, timelines, metrics, preflight."""
