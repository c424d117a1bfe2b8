"""A stand-in for the Esper package, laid out as Esper's kasmina modules are, for
tests/test_esper_install.py (on sys.path only inside that test's fixture)."""
