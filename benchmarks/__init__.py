"""The benchmark harness: suites (suites.py), runs (harness.py), records, tables; the CLI is run.py."""
