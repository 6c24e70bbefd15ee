"""Helpers the tests share: imported from here, never from conftest or from
another test module."""
