"""The lowest layer: errors, type and range checks, the generic registry, the validated config."""
