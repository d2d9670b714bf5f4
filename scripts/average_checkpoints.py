"""Average the weight updates of a run's last checkpoints into one LoRA adapter.

Checkpoints near the end of a run sit around the same minimum; the mean of their weight
updates often scores better than any one of them (checkpoint averaging, "model soups").
The mean is taken over the full updates B·A·scaling, not over A and B separately (which would
not be the mean of the products), and truncated back to a rank by SVD: peft's
`add_weighted_adapter(..., combination_type="svd")`. Whether it helps is a question for
validation (scripts/evaluate_checkpoints.py --extra NAME=OUT@DIALOGUES), never test.

Usage:
  python scripts/average_checkpoints.py --profile embedded \\
      --adapters outputs/embedded-dialogsum-full/checkpoint-{1350,1425,1500} \\
      --out outputs/average-1350-1500
Options: --rank R (default: the largest rank averaged), --weights 1,1,2 (normalised to sum 1),
--overwrite (replace OUT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", nargs="+", required=True, help="peft adapter or checkpoint folders")
    parser.add_argument("--out", required=True, help="folder for the averaged adapter")
    parser.add_argument("--profile", default="embedded", help="the base the adapters were trained on")
    parser.add_argument("--weights", default=None, help="comma-separated, one per adapter (default: equal)")
    parser.add_argument("--rank", type=int, default=None, help="rank of the result (default: the largest input rank)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    from phisum.adapters import AdapterError, check_adapter
    from phisum.files import check_output_dir, replace_folder
    from phisum.profiles import get_profile

    if len(args.adapters) < 2:
        parser.error("--adapters needs at least two folders to average")
    weights = [1.0] * len(args.adapters)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            parser.error(f"--weights expects comma-separated numbers, got {args.weights!r}")
        if len(weights) != len(args.adapters) or sum(weights) <= 0:
            parser.error(f"--weights needs {len(args.adapters)} numbers with a positive sum, got {args.weights!r}")
    weights = [w / sum(weights) for w in weights]
    profile = get_profile(args.profile)
    out = Path(args.out)
    try:
        check_output_dir(out, args.overwrite)
        configs = [check_adapter(Path(p), profile, name=p) for p in args.adapters]
    except (AdapterError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    targets = {tuple(sorted(c.get("target_modules") or [])) for c in configs}
    if len(targets) > 1:
        print(f"error: the adapters target different modules ({' vs '.join(map(str, targets))}); "
              "only adapters of one run can be averaged", file=sys.stderr)
        return 2
    rank = args.rank or max(int(c["r"]) for c in configs)

    import torch
    from peft import PeftModel

    from phisum.models import load_base

    base, _ = load_base(profile, dtype=torch.float32, device="cpu", progress=False)
    names = [f"input{i}" for i in range(len(args.adapters))]
    model = PeftModel.from_pretrained(base, args.adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], args.adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    # named "default" so that save_pretrained writes it at the folder's top, where loaders look
    model.add_weighted_adapter(names, weights, adapter_name="default", combination_type="svd", svd_rank=rank)
    with replace_folder(out) as folder:
        model.save_pretrained(folder, selected_adapters=["default"])
    print(f"averaged {len(names)} adapters (weights {', '.join(f'{w:.3g}' for w in weights)}) into {out} "
          f"at rank {rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
