"""ballot: fair sparse neural networks (Ballot, ISSTA 2024) with baselines, tracking and serving."""

__version__ = "0.1.0"
