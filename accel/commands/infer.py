"""`accel infer`: prefill logits of a token sequence on a target, written as float32 .npy."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from accel.commands._common import add_model, add_target, atomic_write, open_run
from accel.data.prompts import add_prompt_options, prompts_from_args
from accel.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="prefill logits of token ids or prompt text, saved as .npy",
                       description="Run one forward pass and save the logits, float32 of shape [1, S, vocab]. "
                                   "The input is --input-ids, or text through the checkpoint's tokenizer "
                                   "(--prompt, --prompts). With several prompts --out must be an existing "
                                   "directory: prompt i's logits go to OUT/prompt-i.npy (i from 1).")
    add_model(p)
    add_target(p)
    add_prompt_options(p, "comma-separated token ids, e.g. 5,17,33")
    p.add_argument("--out", required=True, metavar="LOGITS.npy|DIR",
                   help="where to write the logits: a file, or an existing directory (prompt-1.npy, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace logits files that already exist")
    p.set_defaults(run=run)


def _refuse_clobbering(paths: list[Path], args: argparse.Namespace) -> None:
    """Before any work: no output may land on what this command reads (a file of the model directory,
    the prompts file, even through a link), and an existing one is replaced only with --overwrite."""
    model = Path(args.model)
    reads = {f.resolve() for f in model.iterdir()} if model.is_dir() else set()
    if args.prompts and Path(args.prompts).is_file():
        reads.add(Path(args.prompts).resolve())
    for path in paths:
        if path.resolve() in reads:
            raise UsageError(f"--out {path} is a file this command reads (the model's or the prompts'); "
                             "give another name")
        if path.exists() and not args.overwrite:
            raise UsageError(f"{path} already exists; pass --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    from accel.runtime import check_ids, infer

    _, inputs = prompts_from_args(args)
    out = Path(args.out)
    to_dir = out.is_dir() and args.input_ids is None
    if len(inputs) > 1 and not to_dir:
        raise UsageError(f"{len(inputs)} prompts need --out to be an existing directory (one .npy per prompt); "
                         f"{out} is not one")
    paths = [out / f"prompt-{n}.npy" for n in range(1, len(inputs) + 1)] if to_dir else [out]
    _refuse_clobbering(paths, args)
    model, backend, params, dtype = open_run(args)
    for ids, path in zip(inputs, paths):
        logits = infer(model, backend, params, check_ids(model, ids))

        def write(tmp, logits=logits):
            with open(tmp, "wb") as f:
                np.save(f, logits)

        atomic_write(path, write)
        print(f"{model.name} on {backend.target} ({dtype}): logits {list(logits.shape)} -> {path}; "
              f"last-position argmax {int(logits[0, -1].argmax())}")
    return 0
