"""Shared fixtures live in tests/support/ and are registered here; suite-wide hypothesis settings."""

from hypothesis import settings

# Wall-clock deadlines per example fail property tests on a loaded 2-core CI machine without telling us anything
# about correctness: speed belongs in benchmarks/. Example counts stay hypothesis' (or each test's own).
settings.register_profile("mpilaunch", deadline=None)
settings.load_profile("mpilaunch")

pytest_plugins = [
    "tests.support.azurite",
    "tests.support.netns",
    "tests.support.emulator",
    "tests.support.exec_sdk",
    "tests.support.docker",
]
