"""Contracts shared by producer and worker: schemas, settings, storage, job state, errors."""
