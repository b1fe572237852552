"""Micro benchmarks of the native hot paths (pytest-benchmark), each against its pure-Python twin."""
