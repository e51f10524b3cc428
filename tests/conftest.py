"""Shared fixtures live in tests/support/ and are registered here."""

pytest_plugins = [
    "tests.support.azurite",
    "tests.support.netns",
    "tests.support.emulator",
    "tests.support.exec_sdk",
    "tests.support.docker",
]
