"""The driver: checks before work, the Ray actor pool and its schedule, progress, submission."""
