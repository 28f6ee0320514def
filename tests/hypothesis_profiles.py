"""Hypothesis settings profiles of the property suite (tests/test_properties*.py).

* ``ci`` (default): derandomised (the same examples on every run and machine), a bounded number of
  examples per test, no example database. Found failures are kept as ``@example(...)`` regressions
  in the test modules.
* ``long``: randomised, 40x the examples, with the local example database ``.hypothesis/`` (ignored
  by git) so that a failure found there replays on the next run until it is fixed or kept as an
  ``@example``. Select it with ``HYPOTHESIS_PROFILE=long`` or ``--hypothesis-profile=long``, e.g.
  ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py -x``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Cases are built from a drawn seed with torch, so data-size checks do not apply; timing is not
# reliable on a shared machine (no deadline); the autouse fixtures (seeding, NaN-poisoned
# torch.empty) are meant to be shared by the examples of one test.
_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

settings.register_profile("ci", max_examples=50, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=2000, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(weight: float) -> int:
    """``max_examples`` for a test: ``weight`` times the active profile's (its cost per example)."""
    return max(1, round(settings.default.max_examples * weight))
