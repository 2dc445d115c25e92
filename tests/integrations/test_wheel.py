"""The release path end to end (slow, run by hand: ``python -m pytest -m slow tests/integrations/test_wheel.py``):
scripts/build_wheel.sh builds the wheel with every architecture, repairs it, installs it in
fresh virtual environments with two torch releases, and runs the whole suite against each,
away from the source tree. CI runs the script's quick form instead (.ci/run), see CONTRIBUTING.md.
GRADCOMP_TEST_WHEEL=path/to/repaired.whl tests that wheel instead of building one;
GRADCOMP_TEST_TORCH="2.3.1 2.14.1" tests against those torch releases."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/integrations/..
SCRIPT = os.path.join(ROOT, "scripts", "build_wheel.sh")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(SCRIPT), reason="needs the source tree (scripts/build_wheel.sh)"),
    pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="torch 2.14.1 lies on disk for Python 3.11 only"),
]


@pytest.fixture(scope="module")
def wheel():
    """The repaired wheel, built once for the module (or the one GRADCOMP_TEST_WHEEL names)."""
    given = os.environ.get("GRADCOMP_TEST_WHEEL")
    if given:
        assert os.path.isfile(given), f"GRADCOMP_TEST_WHEEL={given}: no such file"
        return os.path.abspath(given)
    r = subprocess.run(["bash", SCRIPT, "--no-tests"], capture_output=True, text=True, timeout=3 * 3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    path = [x for x in r.stdout.splitlines() if x.startswith("== wheel: ")][-1].split()[2]
    assert os.path.isfile(path), path
    return path


# torch 2.13.0: the CPU build this machine's CI uses; 2.14.1: a CUDA 13 build (several GB).
# GRADCOMP_TEST_TORCH="2.3.1 2.13.0" picks others (an older torch comes from PyPI, about 3 GB).
TORCH_VERSIONS = os.environ.get("GRADCOMP_TEST_TORCH", "2.13.0 2.14.1").split()


@pytest.mark.parametrize("torch_version", TORCH_VERSIONS)
def test_installed_wheel_passes_the_suite(wheel, torch_version, tmp_path):
    if shutil.disk_usage(tmp_path).free < 12 * 2**30:
        pytest.skip("needs 12 GiB free: a torch CUDA build takes about 6 GB in the test environment")
    # the inner suite leaves this module out (-m "not slow"): no recursion
    r = subprocess.run(["bash", SCRIPT, "--wheel", wheel, "--torch", torch_version, "--venv", str(tmp_path / "venv")],
                       capture_output=True, text=True, timeout=3 * 3600)
    out = r.stdout + r.stderr
    # pytest's report is on stdout; stderr is mostly pip's notices, shown without their noise
    err = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("WARNING: Location"))
    assert r.returncode == 0, f"stdout:\n{r.stdout[-8000:]}\nstderr:\n{err[-3000:]}"
    assert f"torch {torch_version}" in out
    summary = [line for line in r.stdout.splitlines() if " passed" in line][-1:]
    assert summary and " failed" not in summary[0] and " error" not in summary[0], r.stdout[-8000:]
