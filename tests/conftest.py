"""Fixtures come from the modules in tests/fixtures (one per area)."""

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.services",
    "tests.fixtures.images",
    "tests.fixtures.workers",
    "tests.fixtures.results",
]
