"""The suite's own rule (tests/skips.py): with CI=true nothing passes by skipping but CUDA and Docker tests."""

from __future__ import annotations

import pytest

INNER = """
import pytest

def test_without_a_browser():
    pytest.skip("chromium is missing")

@pytest.fixture
def recording():
    pytest.skip("the recording is missing")

def test_without_a_recording(recording):
    pass

@pytest.mark.cuda
def test_on_a_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.docker
def test_building_the_image():
    pytest.skip("needs Docker")

def test_that_runs():
    assert sum([1, 2]) == 3
"""
MISSING_PACKAGE = """
import pytest

pytest.importorskip("no_such_package_here")

def test_that_needs_it():
    pass
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, source: str) -> pytest.RunResult:
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest("-p", "tests.skips")


def test_with_ci_true_a_skip_fails_with_its_reason_unless_it_needs_cuda_or_docker(pytester, monkeypatch):
    result = run(pytester, monkeypatch, "true", INNER)
    result.assert_outcomes(passed=1, skipped=2, failed=1, errors=1)  # a fixture's skip is a setup error
    result.stdout.fnmatch_lines_random([
        "*only CUDA or Docker tests may skip: chromium is missing*",
        "*only CUDA or Docker tests may skip: the recording is missing*",
    ])


def test_with_ci_true_a_module_skipped_for_a_missing_package_fails(pytester, monkeypatch):
    result = run(pytester, monkeypatch, "true", MISSING_PACKAGE)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_inner.py skipped with CI=true*no_such_package_here*"])


def test_elsewhere_skips_stay_skips(pytester, monkeypatch):
    run(pytester, monkeypatch, "", INNER).assert_outcomes(passed=1, skipped=4)
    run(pytester, monkeypatch, "", MISSING_PACKAGE).assert_outcomes(skipped=1)
