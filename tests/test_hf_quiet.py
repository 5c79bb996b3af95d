"""`hf_quiet.transformers()` imports transformers without its "PyTorch was not found" banner,
checked in a fresh process where torch is hidden (as on an install without the test extras)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_HIDE_TORCH = """
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else _find(name, *a, **k)
"""


def _stderr(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", _HIDE_TORCH + code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stderr


def test_no_pytorch_banner_and_the_advice_flag_is_restored():
    assert "PyTorch was not found" in _stderr("import transformers")  # what users saw
    err = _stderr(
        "import os\n"
        "from fedrouter_jax.hf_quiet import transformers\n"
        "tok = transformers().AutoTokenizer.from_pretrained('fedrouter_jax/assets/tiny-llama')\n"
        "assert len(tok) > 0 and 'TRANSFORMERS_NO_ADVISORY_WARNINGS' not in os.environ\n"
    )
    assert "PyTorch was not found" not in err, err
