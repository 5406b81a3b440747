"""Restore time vs the raw read time of the same files: ``checkpoint_bench.py restore``.

.venv/bin/python bench/restore.py [--params 100M|300M] [--cache cold|warm]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_bench import main

if __name__ == "__main__":
    sys.argv.insert(1, "restore")
    sys.exit(main())
