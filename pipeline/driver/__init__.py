"""The driver: checks before work, the Ray actor pool and its schedule, progress, local Ray,
submission."""
