"""Stage 6, the bundle: assembled once for every recipe (manifest, reports, staging, publish or
reject)."""
