#!/usr/bin/env python3
"""Train the seed CNN and write ``<out>.keras`` + ``<out>.json`` (the model card).

Usage:
    python jobs/train.py [--data PATH.npz | --folder DIR] [--out batchscan/models/NAME.keras]

The data default is $BATCHSCAN_DATA/pneumoniamnist_28_full.npz, with BATCHSCAN_DATA
defaulting to ../shared/data. All logic lives in batchscan.site.training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from batchscan.site.training import (
    TrainConfig,
    default_npz_path,
    load_folder,
    load_npz,
    train,
    write_model,
)


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="npz with train_/val_/test_ images and labels")
    source.add_argument("--folder", type=Path, help="folder with NORMAL/ and PNEUMONIA/")
    parser.add_argument(
        "--out", type=Path, default=Path("batchscan/models/pneumonia_cnn_seed.keras")
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--no-class-weights", action="store_true")
    parser.add_argument("--max-train", type=int, help="use only N training images (smoke runs)")
    args = parser.parse_args(argv)

    if args.folder is not None:
        if not args.folder.is_dir():
            parser.exit(2, f"train: folder not found: {args.folder}\n")
        dataset = load_folder(args.folder, seed=args.seed)
    else:
        path = args.data or default_npz_path(Path(__file__).resolve().parents[1])
        if not path.is_file():
            parser.exit(2, f"train: data file not found: {path} (set --data or BATCHSCAN_DATA)\n")
        dataset = load_npz(path)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience,
        seed=args.seed,
        augment=not args.no_augment,
        class_weighting=not args.no_class_weights,
        max_train=args.max_train,
        verbose=2 if not sys.stderr.isatty() else "auto",
    )
    model, report = train(dataset, config)
    command = "python jobs/train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    card = write_model(model, report, dataset, config, args.out, command=command.strip())
    keys = [
        "val_auc",
        "test_auc",
        "test_auc_ci95",
        "test_accuracy",
        "test_sensitivity",
        "test_specificity",
        "test_ece",
    ]
    print(
        json.dumps(
            {
                "model": str(args.out),
                "threshold": card["threshold"],
                "calibration": card["calibration"],
                **{k: card["metrics"][k] for k in keys},
                "epochs_run": card["training"]["epochs_run"],
                "train_seconds": card["training"]["train_seconds"],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
