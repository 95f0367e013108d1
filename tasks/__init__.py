"""Prefect tasks: thin wrappers over ``zooaudit.stages`` (retries, logging, artifacts)."""
