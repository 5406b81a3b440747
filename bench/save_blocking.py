"""Save blocking time vs a synchronous save of the same state: ``checkpoint_bench.py save``.

.venv/bin/python bench/save_blocking.py [--params 100M|300M] [--rounds 5]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_bench import main

if __name__ == "__main__":
    sys.argv.insert(1, "save")
    sys.exit(main())
