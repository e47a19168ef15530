"""Optimizers and learning-rate schedules, each a registry entry."""
