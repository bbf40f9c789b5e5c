"""Rewrite the demo slide's golden record (tests/golden/demo/) from the current code.

Only when a change of behaviour is intended, and say so in the commit:

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golden_outputs import GOLDEN, save
from test_golden import screen_demo_twice

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run_record, batch_record = screen_demo_twice(Path(tmp))
        save(run_record, GOLDEN / "run")
        save(batch_record, GOLDEN / "batch")
        print(f"wrote {GOLDEN}/run and {GOLDEN}/batch")
