"""Fault tests: the service under a killed worker, a restarted database or broker."""
