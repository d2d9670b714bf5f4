"""Before/after ROUGE report; same as `python -m phisum evaluate`.

Usage:
  python scripts/evaluate.py --profile embedded --task dialogsum --data ../shared/data/dialogsum \
      --split test --n 200 --adapters base,dialogsum --out reports/embedded-dialogsum
  python scripts/evaluate.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from phisum.evaluation_cli import main

    sys.exit(main(sys.argv[1:]))
