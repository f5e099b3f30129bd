"""The suite's own rule (conftest.py): a skip fails the run unless it says it is expected."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = {
    "test_missing.py": "import pytest\npytest.importorskip('no_such_module_jaxgpt')\n\ndef test_a():\n    pass\n",
    "test_skips.py": ("import pytest\n\ndef test_gpu():\n    pytest.skip('expected: needs a GPU')\n\n"
                      "def test_quiet():\n    pytest.skip('for no stated reason')\n\ndef test_ok():\n    pass\n"),
}


@pytest.mark.parametrize("modules, rc", [(["test_missing.py", "test_skips.py"], 1), (["test_skips.py"], 1), ([], 0)])
def test_only_expected_skips_pass(tmp_path, modules, rc):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path)
    for name in modules:
        (tmp_path / name).write_text(MODULES[name])
    (tmp_path / "test_gpu.py").write_text("import pytest\n\ndef test_gpu():\n    pytest.skip('expected: needs a GPU')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == rc, r.stdout + r.stderr
    unexpected = r.stdout.partition("unexpected skips")[2]
    assert ("no_such_module_jaxgpt" in unexpected) == ("test_missing.py" in modules)
    assert ("for no stated reason" in unexpected) == ("test_skips.py" in modules)
    assert "needs a GPU" not in unexpected
