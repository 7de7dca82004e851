"""Pruning: physical surgery, scoring criteria, the width planner, and the MoP search (Algorithm 1)."""
