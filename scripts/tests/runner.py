"""Runs a test script's `test_*` functions without pytest (pytest collects them too)."""
import sys
import traceback


def run_tests(namespace):
    """Calls every callable `test_*` of `namespace` (a module's `globals()`) in name order,
    prints PASS / FAIL per test and a summary, and exits 1 if any failed."""
    tests = [(k, f) for k, f in sorted(namespace.items()) if k.startswith("test_") and callable(f)]
    passed = failed = 0
    for name, f in tests:
        try:
            f()
            print(f"PASS {name}")
            passed += 1
        except Exception:  # noqa: BLE001  (every failure is reported and counted)
            print(f"FAIL {name}")
            traceback.print_exc()
            failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
