"""Train a CNN: parse the command line into a TrainConfig and call jaxcnn.training.fit.

    python train.py                                   # LeNet-5 on the embedded digits, Adam
    python train.py --dataset mnist --epochs 10       # MNIST, downloaded once into the cache
    python train.py --dataset fashion_mnist --model small_cnn --data-dir ~/data
    python train.py --resume                          # continue the run in --out
    python train.py --eval-only                       # evaluate the checkpoint in --out
"""

from __future__ import annotations

import argparse
import sys

from jaxcnn import data, models, training


def parse_args(argv=None) -> training.TrainConfig:
    """The command line as a :class:`jaxcnn.training.TrainConfig` (defaults: its defaults)."""
    d = training.TrainConfig()
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a CNN whose layers use hand-derived gradients (jaxcnn).",
    )
    p.add_argument("--dataset", choices=data.DATASETS, default=d.dataset,
                   help="synthetic: the embedded digits, no download (default: %(default)s)")
    p.add_argument("--data-dir", default=d.data_dir, metavar="DIR",
                   help="directory with the four IDX files (default: download them once "
                        "into ~/.cache/jaxcnn)")
    p.add_argument("--model", choices=tuple(models.MODELS), default=d.model,
                   help="default: %(default)s")
    p.add_argument("--impl", choices=("manual", "lax"), default=d.impl,
                   help="manual: the hand-derived gradients; lax: JAX's autodiff "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate, decayed to 0 by a cosine over the run "
                        "(default: %(default)s)")
    p.add_argument("--optimizer", choices=training.OPTIMIZERS, default=d.optimizer,
                   help="momentum: SGD with momentum 0.9 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="initial parameters, batch order and synthetic data (default: "
                        "%(default)s)")
    p.add_argument("--out", default=d.out, metavar="DIR",
                   help="output directory (default: runs/<dataset>-<model>-<impl>-seed<seed>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from the checkpoint in --out")
    mode.add_argument("--eval-only", action="store_true",
                      help="only evaluate the checkpoint in --out on the test set")
    p.add_argument("--n-train", type=int, default=d.n_train, metavar="N",
                   help="use only the first N training examples (quick runs, tests)")
    p.add_argument("--n-test", type=int, default=d.n_test, metavar="N",
                   help="use only the first N test examples")
    args = p.parse_args(argv)
    try:
        return training.TrainConfig(**vars(args))
    except (TypeError, ValueError) as err:
        p.error(str(err))


def main(argv=None) -> int:
    config = parse_args(argv)
    try:
        training.fit(config)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ntrain.py: interrupted; the last checkpoint is in {config.out_dir}: continue "
              f"with the same options and --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
