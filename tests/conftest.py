"""Shared pytest fixtures. Fixture modules live in tests/support/ and are registered here."""

pytest_plugins = ["tests.support.fixtures", "tests.support.model_fixtures"]
