"""Backends: one package per vendor, each implementing dsv32.core.ops.Ops (see core/registry.py)."""
