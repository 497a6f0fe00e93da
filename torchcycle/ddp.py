"""Entry point for `torchcycle train --nproc N`, run on every rank by torchrun.

Rank 0 runs the whole training flow (Prefect run, MLflow tracking, register, gate). The other ranks
prepare the same data with the same plain stage functions (deterministic for a seed) and join the
DDP training inside `fit`; they log and register nothing.
"""

from __future__ import annotations

import os
import sys


def _rank_device(request: str, local_rank: int) -> str:
    import torch

    if request in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return "cpu" if request == "auto" else request


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.distributed as dist

    from torchcycle.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    config = args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cfg = load_config(config, overrides)
    device = _rank_device(cfg.train.device, local_rank)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": device})})
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        if rank == 0:
            import typer

            from torchcycle.cli import run_training
            from torchcycle.local_server import no_heartbeats_on_a_temporary_api

            try:
                with no_heartbeats_on_a_temporary_api():
                    run_training(cfg, as_json="--json" in args, cache="--no-cache" not in args)
            except typer.Exit as done:  # the CLI's clean exit (code 2 on bad input) outside Typer's runner
                sys.exit(done.exit_code)
        else:
            _train_only(cfg)
    finally:
        dist.destroy_process_group()


def _train_only(cfg) -> None:
    import torch

    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.train import train

    prepared = build_features(preprocess(ingest(cfg.data), cfg.data, cfg.seed), cfg.features)
    train(prepared, cfg.model, cfg.train, seed=cfg.seed, device=torch.device(cfg.train.device), progress=False)


if __name__ == "__main__":
    main()
