"""Thin launcher for `python -m phisum train` (alignment-handbook style).

  python scripts/train.py --config phisum/recipes/dialogsum/embedded_cpu.yaml
  python scripts/train.py --config phisum/recipes/dialogsum/phi2_lora_8bit.yaml --max_steps 10
  accelerate launch --num_processes 2 scripts/train.py --config <recipe.yaml>

Every recipe key is also a flag (command line beats YAML); unknown keys fail.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from phisum.training import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
