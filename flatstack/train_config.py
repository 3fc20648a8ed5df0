"""A training run's settings: one validated dataclass (the CLI's --key value options, TOML files and a
run's saved config.json all fill it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flatstack.data import DataError


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    data: str = ""
    model: str = "grok-1-tiny"  # a preset, or a checkpoint to start from
    out: str = "runs/run"
    init_from: str | None = None  # a checkpoint (native or Hugging Face) to continue from
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, for presets
    seed: int = 1337
    max_steps: int = 1000
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    batch_tokens: int | None = None  # if set: tokens per optimizer step; sets grad_accum
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    moe_aux_coef: float = 0.01  # load-balancing loss
    moe_z_coef: float = 0.001  # router z-loss
    eval_every: int = 250  # 0: only at the end
    eval_tokens: int | None = None  # None: the whole validation split
    eval_batch: int = 32
    samples: int = 1  # samples printed at each evaluation
    sample_tokens: int = 200
    sample_prompt: str = ""
    ckpt_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    async_checkpoint: bool = False  # sharded runs: write checkpoints in the background while training goes on
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int | None = None
    tp: int = 1  # tensor-parallel ranks per group (under torchrun): they split each block, share the data
    ep: int = 1  # expert-parallel ranks (under torchrun): they split each MoE layer's experts
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks before the job fails
    progress: bool = True


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.max_steps > 0, "--max-steps must be > 0"),
        (cfg.seq_len > 0, "--seq-len must be > 0"),
        (cfg.batch_size > 0, "--batch-size must be > 0"),
        (cfg.grad_accum > 0, "--grad-accum must be > 0"),
        (cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (cfg.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
        (cfg.lr > 0, "--lr must be > 0"),
        (0 <= cfg.muon_momentum < 1, "--muon-momentum must be in [0, 1)"),
        (cfg.eval_every >= 0 and cfg.ckpt_every >= 0, "--eval-every and --ckpt-every must be >= 0"),
        (cfg.keep_checkpoints > 0, "--keep-checkpoints must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    if cfg.batch_tokens is not None:
        micro = cfg.batch_size * cfg.seq_len
        if cfg.batch_tokens % micro:
            raise DataError(f"--batch-tokens {cfg.batch_tokens} is not a multiple of --batch-size x --seq-len "
                            f"= {micro}")
        cfg.grad_accum = cfg.batch_tokens // micro
