"""Test-wide settings: Prefect runs ephemerally with its state inside the test session."""
import os
import tempfile

# Set before any Prefect import so the ephemeral API and its database live in a temp folder.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tf-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A fresh database is migrated on the first ephemeral start; Prefect's 20 s default fails on a slow CI box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
