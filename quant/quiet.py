"""Third-party output held at the boundary: the suite speaks in its own words, the libraries' with ``-v``.

Every CLI's parser takes ``-v/--verbose`` (quant.errors.ArgumentParser) and calls :func:`configure` once its
flags are read, before any heavy library is imported. Without ``-v``: the libraries' warnings are ignored (the
suite's own still show), their loggers only pass errors, their progress bars are off, and what they print while
the suite calls into them (:func:`held`) is kept back. With ``-v`` all of it shows, storage credentials redacted.
``$QUANT_SUITE_VERBOSE`` carries the choice to the processes a command starts.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "QUANT_SUITE_VERBOSE"
OWN_MODULES = r"(quant|calibration|experiments)(\.|$)"
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "modelopt", "accelerate", "torch", "optuna",
                   "urllib3", "filelock", "numexpr")
# Read by the libraries when they are imported (hence set before any of them is).
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "TF_CPP_MIN_LOG_LEVEL": "3"}
_CREDENTIALS = re.compile(r"(://[^/@\s:]*:)[^@\s]*@|(password=)[^&\s]*", re.IGNORECASE)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(is_verbose: bool) -> None:
    """Apply the choice to this process and to the ones it starts."""
    os.environ[VERBOSE_ENV] = "1" if is_verbose else "0"
    if is_verbose:  # the libraries' warnings shown, through a handler that redacts credentials
        logging.captureWarnings(True)
        shown = logging.getLogger("py.warnings")
        if not any(isinstance(h, _RedactingHandler) for h in shown.handlers):
            shown.addHandler(_RedactingHandler(sys.stderr))
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=OWN_MODULES)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _redacted(text: str) -> str:
    return _CREDENTIALS.sub(lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}***", text)


class _RedactingHandler(logging.StreamHandler):
    def format(self, record: logging.LogRecord) -> str:
        return _redacted(super().format(record))


@contextlib.contextmanager
def held(library: str):
    """Around a call into ``library``: what it prints (stdout and stderr) is kept back, and shown on stderr after
    it with ``-v``. The suite's own output inside the call is not expected (it would be held too)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        text = out.getvalue().strip()
        if text and verbose():
            print("\n".join(f"[{library}] {line}" for line in _redacted(text).splitlines()), file=sys.stderr)
