"""Commands that write folders and resume, built on everything below: ``ticket`` (prune to a ticket folder),
``compare`` (the grid), ``demo`` (the whole story on digits), ``sweep`` (λ trade-off) and ``bench`` (step speed)."""
