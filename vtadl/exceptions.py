"""Errors that the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations


class VtadlError(Exception):
    """Base class of every error that a user can cause and fix."""


class ConfigError(VtadlError):
    """An invalid option, variant or config file."""


class DataError(VtadlError):
    """A missing, empty, unreadable or inconsistent dataset."""


class TrainingError(VtadlError):
    """Training cannot go on (non-finite loss, nothing to resume, ...)."""


class RunError(VtadlError):
    """A run folder that is missing or incomplete."""


class ServiceError(VtadlError):
    """The job queue's Redis cannot be reached, started or used."""


class JobError(VtadlError):
    """An unknown job, a job in a state that does not allow the request, or a refused job."""
