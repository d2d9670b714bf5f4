"""Push a trained adapter and its model card to the Hub; same as `python -m phisum push`.

Usage:
  python scripts/push_to_hub.py --adapter outputs/dialogsum/adapter --repo-id USER/phi2-dialogsum-lora \
      [--private] [--revision v1] [--report reports/phi2-dialogsum]
  python scripts/push_to_hub.py --adapter outputs/dialogsum/adapter --repo-id USER/x --dry-run /tmp/upload
  python scripts/push_to_hub.py --help

Token: HF_TOKEN or `hf auth login`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from phisum.hub import main

    sys.exit(main(sys.argv[1:]))
