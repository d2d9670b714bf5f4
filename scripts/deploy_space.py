"""Upload this checkout as a Gradio Space; same as `python -m phisum deploy-space`.

Usage:
  python scripts/deploy_space.py --repo-id USER/phisum --hardware t4-small --profile phi2 \
      --dialogsum-adapter USER/phi2-dialogsum-lora@v1 --oasst-adapter USER/phi2-oasst-qlora
  python scripts/deploy_space.py --repo-id USER/phisum --dry-run /tmp/space
  python scripts/deploy_space.py --help

Token: HF_TOKEN or `hf auth login`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from phisum.space import main

    sys.exit(main(sys.argv[1:]))
