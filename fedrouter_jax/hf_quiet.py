"""`transformers` imported for its tokenizers only, without its import-time advice.

Without torch, `import transformers` logs "PyTorch was not found. Models won't be available ..."
through `logger.warning_advice`, which transformers silences when
`TRANSFORMERS_NO_ADVISORY_WARNINGS` is set. fedrouter-jax never uses transformers' models, so
the variable is set for the first import only and restored after: later advice still shows.
"""
from __future__ import annotations

import os
import sys
from types import ModuleType

_FLAG = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def transformers() -> ModuleType:
    """The `transformers` module (e.g. `transformers().AutoTokenizer`), first imported quietly."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"]
    before = os.environ.get(_FLAG)
    os.environ[_FLAG] = "1"
    try:
        import transformers as module
    finally:
        if before is None:
            os.environ.pop(_FLAG, None)
        else:
            os.environ[_FLAG] = before
    return module
