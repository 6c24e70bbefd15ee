"""The DataSource interface every backend implements: defined in
``dataspace_core.datasource`` (the worker's PostgresDataSource implements it too),
importable from here as before."""

from dataspace_core.datasource import (  # noqa: F401
    REQUIRED_METHODS,
    DataSource,
    demented_arguments,
    missing_methods,
    taskmanager_arguments,
)
