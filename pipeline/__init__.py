"""sdedit-batch orchestration: job specs, WebDataset I/O, Ray actors, the CLI."""

__version__ = "0.2.0"
