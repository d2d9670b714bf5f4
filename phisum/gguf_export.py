"""`python -m phisum export-gguf`: a peft LoRA adapter folder as a llama.cpp GGUF LoRA adapter.

  python -m phisum export-gguf --adapter DIR --out FILE.gguf [--arch ARCH] [--overwrite]

Reads DIR/adapter_config.json and DIR/adapter_model.safetensors (never pickled .bin weights) and
writes what llama.cpp's convert_lora_to_gguf.py writes, for `llama-server --lora FILE.gguf` on the
matching base GGUF. ARCH (phi2, gemma3) defaults to that of the phisum profile whose base the
adapter records. Adapters llama.cpp would apply differently from peft (DoRA, modules_to_save,
embeddings, per-module alpha, ...) are refused. An existing FILE is replaced only with --overwrite.
Prints the written path on stdout and a one-line summary on stderr; bad input: `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from phisum.data import file_sha256

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# llama.cpp's converter writes the linear weights of these archs unchanged, so peft's A and B
# are valid as they are; an arch whose converter permutes them (llama's q/k) would need B permuted too.
SUPPORTED_ARCHS = ("gemma3", "phi2")
FORMAT_VERSION = 1  # part of the cache key: bump when the written file changes for the same input
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # inits that leave the base weights alone
# Config fields that make peft compute something a GGUF LoRA (y += alpha/r * B A x) cannot.
_REFUSED = {
    "use_dora": "DoRA adapters are not supported by llama.cpp",
    "modules_to_save": "modules_to_save (fully trained modules) cannot be stored in a GGUF LoRA",
    "trainable_token_indices": "trainable token embeddings cannot be stored in a GGUF LoRA",
    "alpha_pattern": "per-module alpha (alpha_pattern) cannot be expressed: a GGUF LoRA has one alpha",
    "lora_bias": "LoRA bias terms are not supported by llama.cpp",
    "layer_replication": "layer_replication changes the base model's layers",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases) is not supported",
}
_VARIANTS = ("use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "kasa_config",
             "monteclora_config", "velora_config")  # peft's LoRA variants with their own forward


class GGUFExportError(ValueError):
    """An adapter or output path this exporter refuses; the message is one line for the user."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    arch: str
    tensors: int
    rank: int
    alpha: float  # the value written to adapter.lora.alpha (llama.cpp scales by alpha / rank)
    sha256: str  # of the source adapter_model.safetensors

    def summary(self) -> str:
        return (f"{self.arch} LoRA, {self.tensors} tensors, rank {self.rank}, alpha {self.alpha:g} "
                f"(scale {self.alpha / self.rank:g}), from adapter_model.safetensors sha256 {self.sha256[:16]}")


def arch_for_base(base_id: str | None) -> str | None:
    from phisum.profiles import PROFILES

    return next((p.gguf_arch for p in PROFILES.values() if p.gguf_arch and p.accepts_base(base_id)), None)


def read_adapter_config(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise GGUFExportError(f"adapter folder {adapter_dir} does not exist")
    try:
        config = json.loads((adapter_dir / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GGUFExportError(f"{adapter_dir} has no {CONFIG}: not a peft adapter folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GGUFExportError(f"cannot read {adapter_dir / CONFIG}: {_one_line(exc)}") from None
    if not isinstance(config, dict):
        raise GGUFExportError(f"{adapter_dir / CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise GGUFExportError(f"peft type {config.get('peft_type')!r} is not LoRA")
    for key, why in [*_REFUSED.items(), *((k, f"LoRA variant {k} is not supported") for k in _VARIANTS)]:
        if config.get(key):
            raise GGUFExportError(why)
    if config.get("bias", "none") != "none":
        raise GGUFExportError(f"bias={config['bias']!r}: trained base biases cannot be stored in a GGUF LoRA")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS or config.get("loftq_config"):
        raise GGUFExportError(f"init_lora_weights={config.get('init_lora_weights')!r} changes the base weights;"
                              " export the adapter converted to plain LoRA first")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or r < 1:
        raise GGUFExportError(f"invalid rank r={r!r} in {CONFIG}")
    # llama.cpp reads alpha 0 as "no alpha" (scale 1), where peft would scale by 0.
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha == 0:
        raise GGUFExportError(f"invalid lora_alpha={alpha!r} in {CONFIG}")
    return config


def _weights(adapter_dir: Path) -> Path:
    if not (adapter_dir / WEIGHTS).is_file():
        found = [p.name for p in adapter_dir.glob("adapter_model.*")]
        hint = f" (found {', '.join(found)}; pickled weights are never loaded)" if found else ""
        raise GGUFExportError(f"{adapter_dir} has no {WEIGHTS}{hint}")
    return adapter_dir / WEIGHTS


def _has_bf16(weights: Path) -> bool:
    """Whether the safetensors header lists a bfloat16 tensor (read from its JSON header only)."""
    try:
        with open(weights, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 1 << 27:
                return False  # not a safetensors header: safe_open reports the real problem
            header = json.loads(handle.read(size) or b"{}")
    except (OSError, ValueError):
        return False  # likewise
    if not isinstance(header, dict):
        return False
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def load_lora_pairs(weights: Path) -> dict[str, tuple]:
    """HF module name (model.layers.0.self_attn.q_proj) -> (A (r x in), B (out x r)) as float32 numpy."""
    import numpy as np
    from safetensors import SafetensorError, safe_open

    pairs: dict[str, dict] = {}
    try:
        # numpy, not torch: the llamacpp backend exports adapters without importing torch. numpy has
        # no bfloat16, so an adapter saved in bf16 is read through torch instead.
        framework = "pt" if _has_bf16(weights) else "np"
        with safe_open(str(weights), framework=framework) as f:
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    # peft saves these whole (save_embedding_layers) when they carry a LoRA.
                    embedding = "embed" in key or "lm_head" in key
                    what = "LoRA on embeddings or the LM head is not supported" if embedding else "not a LoRA weight"
                    raise GGUFExportError(f"cannot export {key}: {what}")
                tensor = f.get_tensor(key)
                if framework == "pt":
                    tensor = tensor.float().numpy()
                if tensor.dtype.kind != "f" or tensor.ndim != 2:
                    raise GGUFExportError(f"{key} is not a 2-D float tensor")
                module = m["module"].replace("model.language_model.", "model.", 1)  # multimodal checkpoints
                pairs.setdefault(module, {})[m["ab"]] = np.ascontiguousarray(tensor, dtype=np.float32)
    except SafetensorError as exc:
        raise GGUFExportError(f"cannot read {weights}: {_one_line(exc)}") from None
    if not pairs:
        raise GGUFExportError(f"{weights} holds no LoRA weights")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise GGUFExportError(f"{module}: lora_A and lora_B are not a pair (one missing, or ranks differ)")
    return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def export_lora_to_gguf(adapter_dir, out_file, arch: str | None = None, overwrite: bool = False) -> ExportResult:
    import gguf

    adapter_dir, out_file = Path(adapter_dir), Path(out_file)
    config, weights = read_adapter_config(adapter_dir), _weights(adapter_dir)
    base = config.get("base_model_name_or_path")
    recorded = arch_for_base(base)
    if arch and recorded and arch != recorded:  # llama.cpp would refuse it on the base GGUF anyway
        raise GGUFExportError(f"the adapter was trained on {base} ({recorded}), not a {arch} model")
    arch = arch or recorded
    if arch not in SUPPORTED_ARCHS:
        why = f"architecture {arch!r} is not supported" if arch else f"no GGUF architecture known for base {base!r}"
        raise GGUFExportError(f"{why}; pass --arch {' or '.join(SUPPORTED_ARCHS)}")
    if out_file.is_dir():
        raise GGUFExportError(f"{out_file} is a folder; give a file name")
    if out_file.exists() and not overwrite:
        raise GGUFExportError(f"{out_file} exists; pass --overwrite to replace it")

    pairs = load_lora_pairs(weights)
    layers = [int(m) for name in pairs for m in re.findall(r"\.layers\.(\d+)\.", name)]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, max(layers, default=0) + 1)
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if not config.get("rank_pattern") and ranks != {config["r"]}:
        raise GGUFExportError(f"tensor ranks {sorted(ranks)} do not match r={config['r']} in {CONFIG}")
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        # peft scales by alpha/sqrt(r), llama.cpp by alpha/r: only one rank can be matched by one alpha.
        if len(ranks) != 1:
            raise GGUFExportError("rsLoRA with several ranks (rank_pattern) cannot be expressed with one alpha")
        alpha *= math.sqrt(next(iter(ranks)))

    tensors = []
    for module, (a, b) in sorted(pairs.items()):
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise GGUFExportError(f"module {module} has no {arch} GGUF tensor name")
        if target in ("token_embd.weight", "output.weight"):
            raise GGUFExportError(f"cannot export {module}: LoRA on embeddings or the LM head is not supported")
        tensors += [(target + ".lora_a", a), (target + ".lora_b", b)]

    sha = file_sha256(weights)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the published file.
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.resolve().name)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # a crash must not leave a complete-looking name over unwritten data
        _publish(tmp, out_file, overwrite)
    except OSError as exc:
        raise GGUFExportError(f"cannot write {out_file}: {_one_line(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out_file, arch, len(tensors), max(ranks), alpha, sha)


def _publish(tmp: Path, out_file: Path, overwrite: bool) -> None:
    if not overwrite:
        try:
            os.link(tmp, out_file)  # unlike a rename, fails if out_file appeared meanwhile
            return
        except FileExistsError:
            raise GGUFExportError(f"{out_file} exists; pass --overwrite to replace it") from None
        except OSError:  # a filesystem without hard links: check, then rename
            if out_file.exists():
                raise GGUFExportError(f"{out_file} exists; pass --overwrite to replace it") from None
    os.replace(tmp, out_file)


def cached_gguf_lora(adapter_dir, arch: str | None = None, cache_root: Path | None = None) -> Path:
    """The adapter as a GGUF under <cache_root>/gguf-lora/, exported on first use only. Named by the
    weights' sha256 and a hash of config, arch and format: an edited adapter gets a new file, not a stale one."""
    if cache_root is None:
        from phisum.embedded import cache_root as default_root

        cache_root = default_root()
    adapter_dir = Path(adapter_dir)
    config, weights = read_adapter_config(adapter_dir), _weights(adapter_dir)
    arch = arch or arch_for_base(config.get("base_model_name_or_path"))
    key = hashlib.sha256(json.dumps([config, arch, FORMAT_VERSION], sort_keys=True).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", adapter_dir.resolve().name) or "adapter"
    path = Path(cache_root) / "gguf-lora" / f"{file_sha256(weights)[:16]}-{key[:8]}-{name}.gguf"
    if not path.exists():
        # Concurrent exports write the same bytes and rename atomically: the last one wins harmlessly.
        export_lora_to_gguf(adapter_dir, path, arch=arch, overwrite=True)
    return path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phisum export-gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="peft adapter folder (adapter_model.safetensors)")
    parser.add_argument("--out", required=True, help="GGUF file to write")
    parser.add_argument("--arch", help=f"{', '.join(SUPPORTED_ARCHS)} (default: from the adapter's base model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    try:
        result = export_lora_to_gguf(args.adapter, args.out, arch=args.arch, overwrite=args.overwrite)
    except GGUFExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.path)
    print(result.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
