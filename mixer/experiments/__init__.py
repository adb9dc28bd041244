"""Experiments from the paper that run here end to end."""
