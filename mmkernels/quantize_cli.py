"""``mmkernels quantize MODEL_DIR OUT_DIR``: quantize a transformers model directory and write a
checkpoint that transformers (and vLLM, for compressed-tensors / GPTQ) load.

The model class comes from the config's ``architectures`` (``AutoModel`` otherwise); calibration
text (``--calib``: a UTF-8 file, one sample per line) is tokenized with the model directory's
tokenizer. Prints the per-layer SQNR table and the line that loads the result.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

FORMATS = ("compressed-tensors", "gptq", "mmkernels")


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a transformers model directory and save it")
    q.add_argument("model_dir", help="a local transformers model directory (config.json, weights)")
    q.add_argument("out_dir", help="where to write the quantized checkpoint")
    q.add_argument("--bits", type=int, default=4, choices=(4, 8))
    q.add_argument(
        "--group-size", type=int, default=None, help="weights per scale group (default: one scale per output channel)"
    )
    q.add_argument(
        "--act-bits", type=int, default=None, choices=(8,), help="8: W8A8 (dynamic per-token int8 activations)"
    )
    q.add_argument("--method", default="rtn", choices=("rtn", "gptq", "signround"))
    q.add_argument("--asymmetric", action="store_true", help="asymmetric (zero-point) weights")
    q.add_argument("--format", default="compressed-tensors", choices=FORMATS)
    q.add_argument("--calib", default=None, help="calibration text: one sample per line (needed by gptq / signround)")
    q.add_argument("--calib-samples", type=int, default=256)
    q.add_argument("--max-length", type=int, default=256, help="calibration tokens per sample")
    q.add_argument(
        "--float-dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="dtype of the tensors left unquantized (embeddings, norms)",
    )
    q.add_argument("--overwrite", action="store_true")


def _model_class(model_dir: str):
    import transformers

    with open(os.path.join(model_dir, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _calibration(model_dir: str, path: str, samples: int, max_length: int) -> List[dict]:
    from transformers import AutoTokenizer

    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()][:samples]
    if not lines:
        raise ValueError(f"--calib {path}: no text lines")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lines.sort(key=len)  # batches with little padding
    return [
        dict(tokenizer(lines[i : i + 16], return_tensors="pt", padding=True, truncation=True, max_length=max_length))
        for i in range(0, len(lines), 16)
    ]


def run(args) -> int:
    import torch

    from .compress import quantize_model, save_quantized

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(
            f"mmkernels quantize: {args.model_dir} has no config.json (a transformers model directory is expected)",
            file=sys.stderr,
        )
        return 2
    if args.method != "rtn" and args.calib is None:
        print(f"mmkernels quantize: --method {args.method} needs --calib FILE", file=sys.stderr)
        return 2
    model = _model_class(args.model_dir).from_pretrained(args.model_dir).eval()
    calib: Optional[list] = None
    if args.calib is not None:
        calib = _calibration(args.model_dir, args.calib, args.calib_samples, args.max_length)
    report = quantize_model(
        model,
        bits=args.bits,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        act_bits=args.act_bits,
        method=args.method,
        calib_data=calib,
        exclude=["lm_head", "*.lm_head"],
        progress=True,
    )
    print(report)
    float_dtype = getattr(torch, args.float_dtype) if args.float_dtype else None
    extra = {} if args.format == "mmkernels" else {"float_dtype": float_dtype}
    save_quantized(model, args.out_dir, format=args.format, overwrite=args.overwrite, tokenizer=args.model_dir, **extra)
    if args.format == "mmkernels":
        print(f"\nwritten {args.out_dir}; load it with:\n  mmkernels.load_quantized({args.out_dir!r}, model)")
    else:
        print(
            f"\nwritten {args.out_dir}; load it with:\n  transformers.AutoModel.from_pretrained("
            f"{args.out_dir!r})   # needs the compressed-tensors / gptq runtime package"
        )
    return 0
