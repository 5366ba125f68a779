"""``featurewatch export-model``: a model as a Hugging Face folder (for vLLM, which cannot read GGUF)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import CLIError, check_output_dir


def register(sub: Any) -> None:
    p = sub.add_parser("export-model", help="write the embedded model (or --model) as a Hugging Face folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must be empty or new)")
    p.add_argument("--model", help="local directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="saved precision (default: float32, the dequantised weights exactly)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the folder and its files as JSON")
    p.set_defaults(func=cmd_export_model)


def cmd_export_model(args: argparse.Namespace) -> int:
    from ..export import export_model

    out = check_output_dir(args.out, "--out")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out {args.out} is not empty; choose another folder or pass --overwrite")
    print("loading the model…", file=sys.stderr)
    path = export_model(out, model=args.model, dtype=args.dtype, overwrite=args.overwrite)
    files = sorted(p.name for p in path.iterdir())
    if args.json:
        print(json.dumps({"out": str(path), "files": files}))
    else:
        print(f"wrote {path} ({', '.join(files)}); serve it with vLLM: see the README's vLLM section")
    return 0
